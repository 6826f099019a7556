"""The verification triangle: every gradient of a model checked three ways.

1. **float64 vs high precision, in ulps.** The analytic backward runs in float64 and, as the same
   code, in mpmath at ``dps`` digits (default 50). The float64 error of every element is measured
   in ulps of the exact value and held to the error analysis of the same float64 computation
   (:mod:`refnet.numerics.errorbound`): the smaller of the rigorous running bound ``e`` and the
   probabilistic bound ``LAMBDA·σ`` (rounding errors as independent bounded terms; Hoeffding gives
   P(|err| > λσ) ≤ 2·exp(−λ²/2) = 2.5e-14 per element for λ = 8). Both grow where the
   computation is ill-conditioned; the rigorous one grows like the product of |W| over depth,
   which is ~3^depth too pessimistic for random-sign weights, so deep nets are held to λσ, which
   measured errors stay within 0.2–1.0 σ of. Passing means: error ≤ bound for every element.
2. **High-precision analytic vs high-precision finite differences** (no backward code involved):
   central differences (L(θ + h v) − L(θ − h v)) / 2h of the forward pass in mpmath, along unit
   vectors (every element, for small models) or random directions (for large ones), compared with
   ⟨g, v⟩. Agreement is counted in significant digits relative to Σ|g_i v_i|, and must reach
   ``digits`` (default 20). The working precision of each check is chosen from the gradient's
   magnitude, so that the loss *change* g·h is resolved to 40 digits: a vanishing gradient of 1e-43
   gets ~100 digits, not 50 (the report says which were used).
3. **float64 central finite differences**, the classic gradcheck, reported with their expected
   noise level u·|L|/(h·|g|): the weak witness, shown so users see why it is weak. It never decides
   pass/fail (it cannot resolve a vanishing gradient at all).

Kinks. Layers report a *kink signature* (ReLU: z > 0). A finite difference whose ±h points have a
different signature from the base point straddles a kink: it is reported as a kink, not compared.
Where float64 and the exact run take different branches (a pre-activation within rounding of 0),
the ulp comparison is reported as a kink too.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np

from ..layers.base import ForwardState
from ..layers.sequential import run_forward, split
from ..model import Model
from ..numerics.backend import FLOAT64, MPBackend
from ..numerics.errorbound import BOUND, LAMBDA
from ..progress import SILENT, Interrupted
from ..regularize import l1_kink_signature, penalty

U64 = 2.0**-53
FD_STEP = 1e-15          # high-precision FD step (for |L| ~ |g|; smaller for steep directions)
FD_TARGET_DIGITS = 30    # the FD itself is set up to be good to ~30 digits (truncation ~h²)
FD_GUARD_DIGITS = 10
MAX_FD_DPS = 2000


@dataclass
class TensorReport:
    """The three checks of one gradient tensor (a parameter, or ``x`` for the input)."""
    name: str
    shape: List[int]
    numel: int
    grad_norm: float            # ‖g‖₂ of the exact gradient
    grad_max_abs: float         # max |g|
    max_abs_err: float          # float64 vs exact
    max_rel_err: float
    max_ulp: float              # worst element's error in ulps of the exact value
    ulp_bound: float            # the bound that element was held to, in ulps
    rigorous_ulp_bound: float   # the rigorous running bound at that element, in ulps
    bound_use: float            # max over elements of error / bound (≤ 1 passes)
    worst_index: List[int]
    ulp_passed: Optional[bool]  # None: not compared (kink)
    fd_mode: str                # "element" or "direction"
    fd_checks: int
    fd_kinks: int
    fd_digits: float            # min digits of agreement, mp analytic vs mp FD (non-kink checks)
    fd_dps: int                 # the most digits any of its FD checks needed
    fd64_rel_err: float         # max relative error of float64 FD (informational)
    fd64_noise: float           # the float64 FD noise level expected for this tensor
    passed: bool
    kinks: List[str] = field(default_factory=list)


@dataclass
class Report:
    passed: bool
    loss: float
    dps: int
    required_digits: float
    fd_mode: str
    train: bool
    tensors: List[TensorReport]
    kinks: List[str]
    # None for a finished run; after Ctrl-C, what was left unchecked (``passed`` is then False,
    # whatever the finished tensors say). Left out of to_dict() when None, so that the JSON of a
    # finished run is what it always was.
    incomplete: Optional[str] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["incomplete"] is None:
            del d["incomplete"]
        for t in d["tensors"]:
            for key, value in t.items():
                if isinstance(value, float) and not math.isfinite(value):
                    t[key] = None if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return d


def _signature_difference(a: List[tuple], b: List[tuple], labels: List[str]) -> Optional[str]:
    """Where two lists of per-layer kink signatures first differ (named by ``labels``), or None."""
    for i, (sa, sb) in enumerate(zip(a, b)):
        for ka, kb in zip(sa, sb):
            diff = np.argwhere(np.asarray(ka) != np.asarray(kb))
            if diff.size:
                return f"{labels[i]} element {tuple(int(j) for j in diff[0])}"
    return None


def _signature_labels(model: Model) -> List[str]:
    """One label per kink-signature entry: the layers, the loss, then the L1 penalty's |w| (if
    any)."""
    return ([f"layers[{i}]" for i in range(len(model.layers))] + [f"the loss ({model.loss.type})"]
            + ["the L1 penalty (|w| at 0)"])


def _digits(ctx, err, scale) -> float:
    """Significant digits of agreement: -log10(err / scale), computed in mpmath (no underflow)."""
    if err == 0:
        return math.inf
    if scale == 0:
        return -math.inf
    return -float(ctx.log10(err / scale))


def _scalar(a):
    return a[()] if isinstance(a, np.ndarray) else a


class _Prefix:
    """The unperturbed forward at one backend, kept top-level layer by layer: ``inputs[j]`` is
    layer j's input, ``signatures[j]`` its kink signature; the penalty's terms and L1 kink
    signature per regularized name. Perturbing a tensor of top-level layer k changes nothing
    before layer k, so an evaluation starts there from ``inputs[k]``."""

    def __init__(self, inputs, signatures, terms, l1_signatures):
        self.inputs, self.signatures = inputs, signatures
        self.terms, self.l1_signatures = terms, l1_signatures


def _penalty_terms(bk, w, name, l1, l2):
    """The penalty's terms of one tensor, in the order ``regularize.penalty`` adds them."""
    terms = []
    if l1:
        terms.append(penalty(bk, {name: w}, [name], l1, 0.0)[0])
    if l2:
        terms.append(penalty(bk, {name: w}, [name], 0.0, l2)[0])
    return terms


class _Problem:
    """The function being differentiated: loss(params, x) with y fixed; one tensor at a time.

    ``prefix_cache``: an evaluation that perturbs a tensor of top-level layer k starts at layer
    k from the cached unperturbed input of that layer (per backend), carrying the cached kink
    signatures of layers < k and the other tensors' penalty terms. Loss and signatures are bit
    for bit those of the full forward (``tests/test_fd_prefix.py``); False runs the full forward
    every time."""

    KEEP = 4        # backends whose converted inputs and prefixes are kept (most recent first)

    def __init__(self, model: Model, params: Dict[str, np.ndarray], x: np.ndarray, y,
                 state: ForwardState, prefix_cache: bool = True):
        self.model, self.params, self.x, self.y = model, params, x, y
        self.state = state
        self.labels = _signature_labels(model)
        self.prefix_cache = prefix_cache
        self._cache = OrderedDict()        # backend name -> {"bk", "in", "prefix"}
        self._backends = OrderedDict()     # dps -> MPBackend

    def replay(self) -> ForwardState:
        """The same mode and the same dropout masks as the first pass; fresh buffer updates."""
        return ForwardState(train=self.state.train, rng=None, masks=self.state.masks)

    def mp(self, dps: int) -> MPBackend:
        """One MPBackend per precision: its converted inputs and prefix are reused by every
        check at that precision (a new backend's private context would convert them again)."""
        return self._memo(self._backends, dps, lambda: MPBackend(dps))

    def _memo(self, table, key, make):
        if key in table:
            table.move_to_end(key)
        else:
            table[key] = make()
            while len(table) > self.KEEP:
                table.popitem(last=False)
        return table[key]

    def _entry(self, bk) -> dict:
        """What is kept for ``bk``: its converted inputs, and (once asked for) its prefix. Kept
        for this backend object only: another one of the same name (a new private context) gets
        its own, so that values of two contexts never mix."""
        entry = self._memo(self._cache, bk.name, lambda: {"bk": bk})
        if entry["bk"] is not bk:
            entry.clear()
            entry["bk"] = bk
        return entry

    def _in(self, bk):
        """params and x converted to ``bk`` once, not at every evaluation."""
        entry = self._entry(bk)
        if "in" not in entry:
            entry["in"] = ({k: bk.asarray(v) for k, v in self.params.items()},
                           bk.asarray(self.x))
        return entry["in"]

    def _prefix(self, bk) -> _Prefix:
        entry = self._entry(bk)
        if "prefix" not in entry:
            params, x = self._in(bk)
            model, state = self.model, self.replay()
            h = bk.asarray(x)
            inputs, signatures = [], []
            for j, layer in enumerate(model.layers):
                inputs.append(h)
                h, cache = run_forward(bk, layer, split(params, j), h, state)
                signatures.append(layer.kink_signature(cache))
            terms, l1_signatures = {}, {}
            if model.l1 or model.l2:
                for n in model.regularized:
                    terms[n] = _penalty_terms(bk, params[n], n, model.l1, model.l2)
                    l1_signatures[n] = l1_kink_signature(params, [n], model.l1)
            entry["prefix"] = _Prefix(inputs, signatures, terms, l1_signatures)
        return entry["prefix"]

    def loss(self, bk, name, value):
        base_params, base_x = self._in(bk)
        if name == "x" or not self.prefix_cache:
            params = base_params if name == "x" else {**base_params, name: value}
            x = value if name == "x" else base_x
            fwd = self.model.forward(bk, params, x, self.y, self.replay())
            return fwd.loss, fwd.kink_signatures
        return self._loss_from(bk, int(name.split(".", 1)[0]), name, value)

    def _loss_from(self, bk, k, name, value):
        """The loss with ``name`` (a tensor of top-level layer k) set to ``value``: layers k..
        run from the cached input of layer k; what precedes comes from the cache."""
        model, prefix, state = self.model, self._prefix(bk), self.replay()
        params = {**self._in(bk)[0], name: value}    # value: already of bk, as in loss()
        h = prefix.inputs[k]
        signatures = list(prefix.signatures[:k])
        for j in range(k, len(model.layers)):
            layer = model.layers[j]
            h, cache = run_forward(bk, layer, split(params, j), h, state)
            signatures.append(layer.kink_signature(cache))
        loss, loss_cache = model.loss.forward(bk, h, self.y)
        signatures.append(model.loss.kink_signature(loss_cache))
        if model.l1 or model.l2:
            total = None
            for n in model.regularized:
                terms = (_penalty_terms(bk, value, n, model.l1, model.l2) if n == name
                         else prefix.terms[n])
                for t in terms:
                    total = t if total is None else total + t
            loss = loss + (bk.zeros(()) if total is None else total)
            l1 = [l1_kink_signature(params, [n], model.l1) if n == name else prefix.l1_signatures[n]
                  for n in model.regularized]
            signatures.append(tuple(s[0] for s in l1 if s) + tuple(s[1] for s in l1 if s))
        return loss, signatures

    def base(self, name):
        return self.x if name == "x" else self.params[name]

    def converted_base(self, bk, name):
        """``bk.asarray(self.base(name))``, converted once per backend."""
        params, x = self._in(bk)
        return x if name == "x" else params[name]


def _fd_vectors(mode, shape, count, rng):
    numel = int(np.prod(shape))
    if mode == "element":
        for i in range(numel):
            v = np.zeros(numel)
            v[i] = 1.0
            yield v.reshape(shape)
    else:
        for _ in range(count):
            v = rng.standard_normal(shape)
            yield v / np.linalg.norm(v)


def verify(model: Model, params=None, x=None, y=None, *, dps: int = 50, digits: float = 20,
           mode: str = "auto", directions: int = 2, seed: int = 0,
           max_elementwise: int = 100, train: Optional[bool] = None,
           progress=None) -> Report:
    """Check every gradient of ``model`` at (params, x, y) three ways; see the module docstring.

    mode: "element" (every element gets its own FD), "direction" (``directions`` random unit
    directions per tensor), or "auto" (element when the model has at most ``max_elementwise``
    parameters and inputs in all, direction otherwise). ``train``: the mode (default: the
    spec's); in train mode dropout masks are drawn once and every pass uses the same ones.
    ``progress``: a ``refnet.progress.Reporter`` told of every tensor checked (default silent).
    Ctrl-C raises ``refnet.progress.Interrupted`` whose ``partial`` is the Report of the tensors
    finished, marked ``incomplete`` and not passed (None if none was).
    """
    if mode not in ("auto", "element", "direction"):
        raise ValueError(f"verify: mode must be auto, element or direction, got {mode!r}")
    params, x, y = model.prepare(params, x, y)
    learnable = list(model.param_shapes())
    total = x.size + sum(params[name].size for name in learnable)
    if mode == "auto":
        mode = "element" if total <= max_elementwise else "direction"

    progress = SILENT if progress is None else progress
    names = learnable + ["x"]
    tensors = []
    progress.start(len(names), "tensors")
    try:
        progress.update(0, "the float64 and error-bound passes")
        first = model.default_state(train)
        g64 = model.loss_and_grads(FLOAT64, params, x, y, first)     # draws the dropout masks
        problem = _Problem(model, params, x, y, first)
        gb = model.loss_and_grads(BOUND, params, x, y, problem.replay())
        progress.update(0, f"the {dps}-digit pass")
        mp = MPBackend(dps)
        gm = model.loss_and_grads(mp, params, x, y, problem.replay())

        loss_mp = gm.loss
        global_kinks = []
        branch = _signature_difference(g64.forward.kink_signatures, gm.forward.kink_signatures,
                                       problem.labels)
        if branch:
            global_kinks.append(f"float64 and exact take different branches at {branch}")

        rng = np.random.default_rng(seed)
        for name in names:
            f64 = np.asarray(g64.params[name] if name != "x" else g64.x, dtype=np.float64)
            # The bound is computed by the BoundBackend, whose values are those of float64 bit
            # for bit (a test checks); the result held to it is the float64 backend's own.
            bound_arr = gb.params[name] if name != "x" else gb.x
            exact = gm.params[name] if name != "x" else gm.x
            bound = np.minimum(bound_arr.e, bound_arr.probabilistic_bound(LAMBDA))
            tensors.append(_check_tensor(name, f64, bound, bound_arr.e, bound_arr.sigma, exact,
                                         mp, problem, loss_mp,
                                         float(g64.loss), mode, directions, rng, digits,
                                         ulp_kink=bool(branch),
                                         base_signatures=gm.forward.kink_signatures))
            progress.update(len(tensors), f"{name} {'ok' if tensors[-1].passed else 'FAIL'}")
    except KeyboardInterrupt as stop:
        # Keep the tensors finished; the one being checked is dropped. Before the first one
        # there is nothing to report.
        done = len(tensors)
        if not done:
            raise Interrupted(f"interrupted before the first of {len(names)} gradient tensors "
                              f"was checked", None, 0, len(names)
                              ).with_traceback(stop.__traceback__) from None
        message = f"interrupted after {done} of {len(names)} gradient tensors"
        partial = Report(False, float(g64.loss), dps, digits, mode, first.train, tensors,
                         global_kinks,
                         incomplete=f"{message}; not checked: {', '.join(names[done:])}")
        raise Interrupted(message, partial, done, len(names)
                          ).with_traceback(stop.__traceback__) from None
    finally:
        progress.close()

    passed = all(t.passed for t in tensors)
    return Report(passed, float(g64.loss), dps, digits, mode, first.train, tensors, global_kinks)


def _check_tensor(name, f64, bound, rigorous, sigma, exact, mp, problem, loss_mp, loss64, mode,
                  directions, rng, required, ulp_kink, base_signatures):
    exact_f = mp.to_numpy(exact)
    err = mp.to_numpy(mp.abs(mp.asarray(f64) - exact))
    ulp = np.spacing(np.abs(exact_f))
    ulps = err / ulp
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(exact_f != 0, err / np.abs(exact_f), np.where(err == 0, 0.0, np.inf))
        use = np.where(bound > 0, err / bound, np.where(err == 0, 0.0, np.inf))
    worst = np.unravel_index(int(np.argmax(ulps)), ulps.shape) if ulps.size else ()
    ulp_passed = None if ulp_kink else bool(np.all(err <= bound))

    # High-precision and float64 finite differences -----------------------------------------
    base = problem.base(name)
    fd_digits, fd_dps, fd_kinks, checks = math.inf, 0, 0, 0
    fd64_rel, fd64_noise = 0.0, 0.0
    kink_notes = []
    abs_exact = mp.abs(exact)
    h64 = U64 ** (1 / 3) * max(1.0, float(np.max(np.abs(base))) if base.size else 1.0)
    for v in _fd_vectors(mode, f64.shape, directions, rng):
        checks += 1
        v_mp = mp.asarray(v)
        analytic = _scalar(mp.sum(exact * v_mp))
        scale = _scalar(mp.sum(abs_exact * mp.abs(v_mp)))
        # The exact analytic value carries rounding noise of about M·10^-dps, M the magnitude of
        # the terms it was formed from (σ/u of the float64 analysis). A gradient that cancels to
        # (nearly) zero — the bias before a BatchNorm — is compared relative to M·10^-(dps −
        # required − 5) instead of to its own noise.
        magnitude = float(np.sum(sigma / U64 * np.abs(v)))
        floor = magnitude * 10.0 ** -(mp.dps - required - 5)
        if floor > float(scale):
            scale = mp.ctx.mpf(floor)
        ok, d, dps_used, kink = _fd_check(problem, name, v, analytic, scale, loss_mp,
                                          base_signatures)
        fd_dps = max(fd_dps, dps_used)
        if kink:
            fd_kinks += 1
            if len(kink_notes) < 3:
                kink_notes.append(kink)
        else:
            fd_digits = min(fd_digits, d)
        # float64 FD along the same vector
        lp, _ = problem.loss(FLOAT64, name, base + h64 * v)
        lm, _ = problem.loss(FLOAT64, name, base - h64 * v)
        fd64 = (float(lp) - float(lm)) / (2 * h64)
        an64 = float(np.sum(f64 * v))
        s64 = float(np.sum(np.abs(f64 * v)))
        if s64 > 0:
            # s64 can be subnormal (a gradient that cancels to ~0 along v): the relative error
            # and the noise then exceed float64's range, and are reported as inf — float64 FD
            # cannot resolve such a direction at all (the high-precision leg above still does).
            with np.errstate(over="ignore"):
                fd64_rel = max(fd64_rel, float(np.float64(abs(fd64 - an64)) / s64))
                fd64_noise = max(fd64_noise, float(np.float64(U64 * abs(loss64)) / h64 / s64))
        elif fd64 != 0:
            fd64_rel = math.inf
    fd_passed = fd_digits >= required
    ulp_ok = ulp_passed is not False
    exact_abs = np.abs(exact_f)
    # Where the exact value is ~0 its ulp is subnormal and a bound counted in ulps can exceed
    # float64's range: it is reported as inf (the element is held to the bound, not to ulps).
    with np.errstate(over="ignore"):
        return TensorReport(
            name=name, shape=list(f64.shape), numel=int(f64.size),
            grad_norm=float(np.linalg.norm(exact_f)),
            grad_max_abs=float(exact_abs.max()) if exact_abs.size else 0.0,
            max_abs_err=float(err.max()) if err.size else 0.0,
            max_rel_err=float(rel.max()) if rel.size else 0.0,
            max_ulp=float(ulps[worst]) if ulps.size else 0.0,
            ulp_bound=float(bound[worst] / ulp[worst]) if ulps.size else 0.0,
            rigorous_ulp_bound=float(rigorous[worst] / ulp[worst]) if ulps.size else 0.0,
            bound_use=float(use.max()) if use.size else 0.0,
            worst_index=[int(i) for i in worst],
            ulp_passed=ulp_passed, fd_mode=mode, fd_checks=checks, fd_kinks=fd_kinks,
            fd_digits=float(fd_digits), fd_dps=int(fd_dps), fd64_rel_err=float(fd64_rel),
            fd64_noise=float(fd64_noise), passed=bool(ulp_ok and fd_passed), kinks=kink_notes)


def _fd_check(problem, name, v, analytic, scale, loss_mp, base_signatures):
    """One high-precision central difference along v. Returns (ok, digits, dps, kink note)."""
    loss_abs = abs(float(_scalar(loss_mp))) or 1e-300
    s = float(scale)
    if s > 0:
        h = FD_STEP * min(1.0, loss_abs / s)
        # Digits to resolve L(θ ± hv) − L(θ) ≈ h·s to FD_TARGET_DIGITS, plus guard digits.
        dps = FD_TARGET_DIGITS + FD_GUARD_DIGITS + max(0, math.ceil(math.log10(loss_abs / (h * s))))
    else:
        h = FD_STEP
        dps = FD_TARGET_DIGITS + FD_GUARD_DIGITS + 2 * FD_TARGET_DIGITS
    dps = min(dps, MAX_FD_DPS)
    bk = problem.mp(dps)
    ctx = bk.ctx
    point = problem.converted_base(bk, name)
    step = bk.asarray(v) * ctx.mpf(h)
    lp, sig_p = problem.loss(bk, name, point + step)
    lm, sig_m = problem.loss(bk, name, point - step)
    crossing = (_signature_difference(base_signatures, sig_p, problem.labels)
                or _signature_difference(base_signatures, sig_m, problem.labels))
    if crossing:
        return False, math.nan, dps, f"FD step crosses a kink at {crossing}"
    fd = (_scalar(lp) - _scalar(lm)) / (2 * ctx.mpf(h))
    a = ctx.mpf(analytic)
    if s > 0:
        ref = ctx.mpf(scale)
    else:
        # No gradient along v: FD must vanish to the rounding level of the loss at this dps.
        ref = ctx.mpf(loss_abs) * ctx.mpf(10) ** (-(dps - FD_TARGET_DIGITS)) / ctx.mpf(h)
    d = _digits(ctx, abs(fd - a), ref)
    return True, min(d, float(dps)), dps, None



@dataclass
class SpotCheck:
    """Check 1 of the triangle alone: float64 vs the ``dps``-digit run, every gradient element
    held to min(e, LAMBDA·σ). ``passed`` is None where float64 and the exact run take different
    branches at a kink (nothing to compare); ``worst_use`` is max err/bound (≤ 1 passes)."""
    passed: Optional[bool]
    worst_use: float
    dps: int


def spot_check(model: Model, params, x, y, *, dps: int = 30,
               train: Optional[bool] = None) -> SpotCheck:
    """float64 gradients of (params, x, y) checked against the high-precision backend — the
    cheap part of :func:`verify` (no finite differences), for sweeps such as ``refnet study``."""
    params, x, y = model.prepare(params, x, y)
    first = model.default_state(train)
    g64 = model.loss_and_grads(FLOAT64, params, x, y, first)
    replay = lambda: ForwardState(train=first.train, rng=None, masks=first.masks)  # noqa: E731
    gb = model.loss_and_grads(BOUND, params, x, y, replay())
    mp = MPBackend(dps)
    gm = model.loss_and_grads(mp, params, x, y, replay())
    if _signature_difference(g64.forward.kink_signatures, gm.forward.kink_signatures,
                             _signature_labels(model)):
        return SpotCheck(None, math.nan, dps)
    worst = 0.0
    for name in list(model.param_shapes()) + ["x"]:
        f64 = np.asarray(g64.params[name] if name != "x" else g64.x, dtype=np.float64)
        bound_arr = gb.params[name] if name != "x" else gb.x
        exact = gm.params[name] if name != "x" else gm.x
        if not np.all(np.isfinite(f64)):
            return SpotCheck(False, math.inf, dps)
        err = mp.to_numpy(mp.abs(mp.asarray(f64) - exact))
        bound = np.minimum(bound_arr.e, bound_arr.probabilistic_bound(LAMBDA))
        with np.errstate(divide="ignore", invalid="ignore"):
            use = np.where(bound > 0, err / bound, np.where(err == 0, 0.0, np.inf))
        worst = max(worst, float(use.max()) if use.size else 0.0)
    return SpotCheck(worst <= 1.0, worst, dps)
