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

Engines. Every exact backend made here comes from :func:`exact_backend` (``engine``: one of
:data:`EXACT_ENGINES`); the report names the one that ran (``Report.engine``).

Fan-out. The unit of work of check 2 is one FD vector of one tensor (:func:`_fd_vector`).
``jobs`` runs them on that many local processes, ``executor`` on any
``concurrent.futures.Executor`` (a ``dask.distributed`` client's, for a cluster). The random
directions are drawn here, in the parent, in the order of a one-process run; the results are
gathered in that order, and check 3's float64 differences run here, on the BLAS of the float64
gradient they are compared with: the report is the same whatever ran it (timings aside).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Dict, List, NamedTuple, Optional

import numpy as np

from ..layers.base import ForwardState
from ..model import ForwardPrefix, Model
from ..numerics.backend import FLOAT64, MPBackend
from ..numerics.errorbound import BOUND, LAMBDA
from ..numerics.expansion import BLAS_THREAD_VARIABLES, ExpansionBackend, ExpansionRangeError, available_cores
from ..progress import SILENT, Interrupted
from ..regularize import l1_kink_signature, penalty

U64 = 2.0**-53
FD_STEP = 1e-15          # high-precision FD step (for |L| ~ |g|; smaller for steep directions)
FD_TARGET_DIGITS = 30    # the FD itself is set up to be good to ~30 digits (truncation ~h²)
FD_GUARD_DIGITS = 10
MAX_FD_DPS = 2000

# The exact engines verify and spot_check accept. "expansion": ExpansionBackend (arrays of
# float64 expansions, every operation within 2^(1-prec); numerics/expansion.py); "mpmath":
# MPBackend (numpy object arrays of mpf at dps digits, the reference); "auto": the expansion
# engine where it is the faster one — a model with a tensor of at least EXPANSION_MIN_SIZE
# elements (a parameter, the input, or a top-level layer's output over the batch), at most
# EXPANSION_MAX_DPS digits — and mpmath otherwise, and wherever the expansion engine refuses
# (ExpansionRangeError: values beyond the float64 exponent range it is exact in).
EXACT_ENGINES = ("auto", "expansion", "mpmath")
# Measured on two cores (spec/verification.md, "Engines"): the expansion engine spends ~50 numpy
# calls per operation whatever the size, mpmath ~1 µs per element; on the shipped examples
# (largest tensors 64-4096 elements) mpmath was as fast or up to 3x faster, on LeNet-5 (37k), the
# 784-256-256-10 MLP (200k) and the 16-channel residual block (16k) the expansion engine 5-10x.
EXPANSION_MIN_SIZE = 8192
# K = ceil((prec + 12)/53) components: 7 at 100 digits, 9 at 120; the cost of a product grows
# like K², mpmath's like K^1.6, and above ~120 digits (the FD checks of vanishing gradients)
# mpmath is the better engine at any size.
EXPANSION_MAX_DPS = 120

# jobs=None fans the FD vectors out over every core only when they are worth a pool. A pool of
# spawned workers costs ~1 s to start (each imports numpy, mpmath and refnet; on two cores) and
# every worker builds its own converted parameters and prefix per working precision; the FD
# leg costs ~1-3 µs per value of one forward per FD check in mpmath (LeNet-5 at batch 8: 22
# checks × ~180k values in ~10 s on one core). So below POOL_MIN_WORK = 1e6 checks × values
# (~1-3 s of FD on one core) the FD leg runs in this process; above it a pool pays for itself.
POOL_MIN_WORK = 1_000_000


def exact_backend(dps: int, engine: str = "auto", size: Optional[int] = None):
    """The exact (high-precision) backend at ``dps`` digits that ``engine`` names: the one
    place verify, spot_check and the finite differences get theirs from. ``size``: the
    model's largest tensor (``largest_tensor``), which "auto" decides by (None: large)."""
    if engine not in EXACT_ENGINES:
        raise ValueError(f"engine must be one of {', '.join(EXACT_ENGINES)}, got {engine!r}")
    if engine == "expansion" or (engine == "auto" and dps <= EXPANSION_MAX_DPS
                                 and (size is None or size >= EXPANSION_MIN_SIZE)):
        return ExpansionBackend(dps)
    return MPBackend(dps)


def largest_tensor(model: Model, params, x) -> int:
    """Elements of the model's largest tensor: a parameter, the input batch, or a top-level
    layer's output over the batch (what "auto" chooses its engine by)."""
    batch = x.shape[0] if x.ndim else 1
    sizes = [int(np.size(v)) for v in params.values()] + [int(x.size)]
    sizes += [batch * int(np.prod(layer.out_shape)) for layer in model.layers]
    return max(sizes)


def _exact_run(engine: str, bk, run, fallback):
    """``(backend, run(backend), refusal or None)``: ``run`` in the exact backend ``bk``, and
    where the expansion engine refuses (``ExpansionRangeError``) under ``engine="auto"``, in
    ``fallback()`` (an mp backend) instead — the one place verify's exact pass, spot_check and
    every FD check fall back. An explicit ``engine="expansion"`` that cannot run is a one-line
    error."""
    try:
        return bk, run(bk), None
    except ExpansionRangeError as refusal:
        if engine != "auto":
            raise ExpansionRangeError(f"engine expansion: {refusal}; engine auto runs mpmath "
                                      f"there") from None
        bk = fallback()
        return bk, run(bk), refusal


def _engine_description(bk) -> str:
    return getattr(bk, "description", repr(bk))


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
    engine: str = ""            # the exact backend that ran (its description)
    # Seconds: "float64_and_bound" (the float64 and error-bound passes), "exact" (the dps-digit
    # loss and gradients), "fd_exact" (the high-precision FD, summed over every vector where it
    # ran: with several workers, more than its share of the wall clock), "fd_float64" (the
    # float64 FD), "total" (the whole call, wall clock).
    timings: Dict[str, float] = field(default_factory=dict)

    def to_dict(self, timings: bool = False) -> dict:
        """The report as plain JSON data. Without ``timings`` it is a function of the inputs
        alone (two runs of the same check give equal dicts, whatever ran them); ``timings=True``
        adds the seconds of each leg (``refnet verify --json`` does)."""
        d = asdict(self)
        if not timings:
            del d["timings"]
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
    signatures of layers < k and the other tensors' penalty terms (``Model.forward_tensors``
    with a ``ForwardPrefix``). Loss and signatures are bit for bit those of the full forward
    (``tests/test_fd_prefix.py``); False runs the full forward every time. ``engine``: the
    exact engine of the high-precision evaluations (``exact_backend``)."""

    KEEP = 4        # backends whose converted inputs and prefixes are kept (most recent first)

    def __init__(self, model: Model, params: Dict[str, np.ndarray], x: np.ndarray, y,
                 state: ForwardState, prefix_cache: bool = True, engine: str = "auto"):
        self.model, self.params, self.x, self.y = model, params, x, y
        self.state = state
        self.labels = _signature_labels(model)
        self.prefix_cache = prefix_cache
        self.engine = engine
        self.size = largest_tensor(model, params, x)
        self._cache = OrderedDict()        # backend name -> {"bk", "in", "prefix"}
        self._backends = OrderedDict()     # dps -> exact backend
        self._fallbacks = OrderedDict()    # dps -> MPBackend, where the expansion engine refused

    def replay(self) -> ForwardState:
        """The same mode and the same dropout masks as the first pass; fresh buffer updates."""
        return ForwardState(train=self.state.train, rng=None, masks=self.state.masks)

    def mp(self, dps: int):
        """One exact backend per precision: its converted inputs and prefix are reused by every
        check at that precision (a new backend's private context would convert them again)."""
        return self._memo(self._backends, dps,
                          lambda: exact_backend(dps, self.engine, self.size))

    def fallback(self, dps: int):
        """The mp backend at ``dps`` digits, for a check the expansion engine refused."""
        return self._memo(self._fallbacks, dps, lambda: exact_backend(dps, "mpmath"))

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
            model = self.model
            fwd = model.forward_tensors(bk, params, x, self.y, self.replay())
            terms, l1_signatures = {}, {}
            if model.l1 or model.l2:
                for n in model.regularized:
                    terms[n] = _penalty_terms(bk, params[n], n, model.l1, model.l2)
                    l1_signatures[n] = l1_kink_signature(params, [n], model.l1)
            entry["prefix"] = _Prefix(fwd.inputs, fwd.kink_signatures[:len(model.layers)],
                                      terms, l1_signatures)
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
        """The loss with ``name`` (a tensor of top-level layer k) set to ``value``: the model's
        forward from layer k, on the cached input of layer k; what precedes comes from the
        cache, the perturbed tensor's penalty terms and L1 signature are its own."""
        model, prefix = self.model, self._prefix(bk)
        params = {**self._in(bk)[0], name: value}    # value: already of bk, as in loss()
        terms, l1_signatures = prefix.terms, prefix.l1_signatures
        if name in terms:
            terms = {**terms, name: _penalty_terms(bk, value, name, model.l1, model.l2)}
            l1_signatures = {**l1_signatures,
                             name: l1_kink_signature(params, [name], model.l1)}
        fwd = model.forward_tensors(bk, params, prefix.inputs[k], self.y, self.replay(),
                                    start=k, prefix=ForwardPrefix(prefix.signatures[:k], terms,
                                                                  l1_signatures))
        return fwd.loss, fwd.kink_signatures

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


# --- the fan-out of the FD vectors ---------------------------------------------------------

class _FDTask(NamedTuple):
    """One FD vector of one tensor, as plain data (numpy, ints, floats: no mpf crosses a
    process). ``analytic`` and ``scale`` are exact: (m, e) with value m·2^e."""
    name: str
    v: np.ndarray
    analytic: tuple     # Σ g_exact·v at dps digits
    scale: tuple        # what agreement is counted relative to (Σ|g_exact·v|, or the floor)
    scale_float: float  # the same, correctly rounded to float64 (it sets the step and the dps)
    loss_abs: float     # |L| at the base point (float64 of the exact loss; 1e-300 if 0)


class _FDResult(NamedTuple):
    digits: float
    dps: int
    kink: Optional[str]
    seconds: float


def _exact_pair(value) -> tuple:
    """An mpf as (m, e), m·2^e exactly; ``ctx.mpf((m, e))`` reads it back rounded to ctx's
    precision, as ``ctx.mpf(value)`` would."""
    sign, man, exp, _ = value._mpf_
    if not man and exp:
        raise ValueError(f"verify: a non-finite exact value ({value}) in the FD setup")
    return (-int(man) if sign else int(man), int(exp))


def _fd_vector(problem: "_Problem", task: _FDTask, base_signatures) -> _FDResult:
    """The unit of work that fans out: the high-precision central difference along ``task.v``
    (check 2). Its float64 twin (check 3) runs where the float64 gradient ran, in the parent
    (``_fd64``): float64 sums follow the BLAS and its thread count (a worker's BLAS runs one
    thread, a cluster's may be another library), and check 3 compares the float64 FD with that
    float64 gradient; so the float64 column too is the same whatever ran the vectors."""
    t0 = time.perf_counter()
    d, dps_used, kink = _fd_check(problem, task.name, task.v, task.analytic, task.scale,
                                  task.scale_float, task.loss_abs, base_signatures)
    return _FDResult(d, dps_used, kink, time.perf_counter() - t0)


def _fd64(problem: "_Problem", name, v, h64) -> float:
    """The float64 central difference along v (check 3)."""
    base = problem.base(name)
    lp, _ = problem.loss(FLOAT64, name, base + h64 * v)
    lm, _ = problem.loss(FLOAT64, name, base - h64 * v)
    return (float(lp) - float(lm)) / (2 * h64)


class _Payload(NamedTuple):
    """What a worker needs to build its own ``_Problem``: plain numpy and JSON data (the model
    is rebuilt from its spec; the dropout masks are the parent's)."""
    spec: dict
    params: Dict[str, np.ndarray]
    x: np.ndarray
    y: np.ndarray
    train: bool
    masks: Dict[str, np.ndarray]
    base_signatures: list
    engine: str
    prefix_cache: bool

    def key(self) -> str:
        """A digest of the content: equal payloads (and only they, short of a SHA-256
        collision) share a worker's cached problem, whichever client sent them."""
        h = hashlib.sha256(json.dumps([self.spec, self.train, self.engine, self.prefix_cache],
                                      sort_keys=True).encode())

        def add(a):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        for table in (self.params, self.masks):
            for k in sorted(table):
                h.update(k.encode())
                add(table[k])
        add(self.x)
        add(self.y)
        for layer in self.base_signatures:
            h.update(b"|")
            for sig in layer:
                add(sig)
        return h.hexdigest()


# The problems built in this worker (process, or thread: each thread of a threaded executor
# has its own), by payload key. One is kept: a worker serves one verify at a time.
_WORKER = threading.local()


def _worker_problem(key: str, payload: Optional[_Payload]):
    cached = getattr(_WORKER, "problem", None)
    if cached is None or cached[0] != key:
        if payload is None:
            raise RuntimeError("verify: an FD task reached a worker that holds no problem")
        model = Model(payload.spec)
        state = ForwardState(train=payload.train, rng=None, masks=payload.masks)
        problem = _Problem(model, payload.params, payload.x, payload.y, state,
                           prefix_cache=payload.prefix_cache, engine=payload.engine)
        _WORKER.problem = cached = (key, problem, payload.base_signatures)
    return cached[1], cached[2]


def _init_worker(key: str, payload: _Payload):
    """A pool worker of ``jobs``: builds the problem once. Ctrl-C is the parent's to handle
    (it cancels what is pending); a terminal's SIGINT reaches the whole process group, and a
    worker must not die of it with a traceback of its own. The worker was spawned with SIGINT
    blocked (``_WorkerProcess``), so that one arriving while it starts waits; here it is
    ignored for good, and what was pending is dropped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _worker_problem(key, payload)


# A pool worker's BLAS runs one thread: the pool already puts one worker on every core, and N
# workers each running a BLAS of N threads oversubscribe the machine (measured on 2 cores:
# LeNet-5's FD leg took 3.5 times as long as in one process). The variables are set for the
# moment a worker is spawned (what loky does); the parent's own BLAS is already running and
# keeps its threads.
_SPAWN_LOCK = threading.Lock()


class _WorkerProcess(SpawnProcess):
    """A spawned process (a fresh interpreter on every OS: nothing inherited — no threads, no
    monkeypatches) whose BLAS runs one thread."""

    @staticmethod
    def _Popen(process_obj):
        # SIGINT is blocked in this thread while the worker is spawned, and the child inherits
        # the mask: a Ctrl-C during its start stays pending there until _init_worker ignores
        # it (here it is delivered when the mask is restored: nothing is lost).
        block = hasattr(signal, "pthread_sigmask")
        with _SPAWN_LOCK:
            saved = {k: os.environ.get(k) for k in BLAS_THREAD_VARIABLES}
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if block else None
            os.environ.update({k: "1" for k in BLAS_THREAD_VARIABLES})
            try:
                return SpawnProcess._Popen(process_obj)
            finally:
                for k, value in saved.items():
                    if value is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = value
                if block:
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class _WorkerContext(SpawnContext):
    Process = _WorkerProcess


def _fd_task(key: str, payload: Optional[_Payload], task: _FDTask) -> _FDResult:
    """What a worker runs: ``payload`` None in a ``jobs`` pool (its initializer built the
    problem), the whole payload with every task on an ``executor`` (built once per worker, on
    the first task of a verify that reaches it, then looked up by ``key``)."""
    problem, base_signatures = _worker_problem(key, payload)
    return _fd_vector(problem, task, base_signatures)


class _Deferred:
    """A future computed when its result is asked for: the FD vectors of ``jobs=1``, which run
    in this process, one tensor after the other, as their results are gathered."""

    def __init__(self, fn, *args):
        self._fn, self._args, self._done, self._value = fn, args, False, None

    def result(self):
        if not self._done:
            self._value, self._done = self._fn(*self._args), True
        return self._value

    def done(self):
        return self._done

    def cancel(self):
        return not self._done



def _forward_values(model: Model, params, x) -> int:
    """The values one forward holds: parameters, input, every top-level layer's output."""
    batch = x.shape[0]
    return (x.size + sum(int(np.size(p)) for p in params.values())
            + batch * sum(int(np.prod(layer.out_shape)) for layer in model.layers))


def _check_jobs(jobs, executor):
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, (int, np.integer))
                             or jobs < 1):
        raise ValueError(f"verify: jobs must be an integer >= 1 (or None: every core), "
                         f"got {jobs!r}")
    if executor is not None:
        if jobs is not None:
            raise ValueError("verify: give jobs or executor, not both (an executor brings its "
                             "own workers)")
        if not callable(getattr(executor, "submit", None)):
            raise ValueError(f"verify: executor must have concurrent.futures.Executor's submit, "
                             f"got {type(executor).__name__}")


def verify(model: Model, params=None, x=None, y=None, *, dps: int = 50, digits: float = 20,
           mode: str = "auto", directions: int = 2, seed: int = 0,
           max_elementwise: int = 100, train: Optional[bool] = None,
           progress=None, engine: str = "auto", jobs: Optional[int] = None,
           executor=None) -> Report:
    """Check every gradient of ``model`` at (params, x, y) three ways; see the module docstring.

    mode: "element" (every element gets its own FD), "direction" (``directions`` random unit
    directions per tensor), or "auto" (element when the model has at most ``max_elementwise``
    parameters and inputs in all, direction otherwise). ``train``: the mode (default: the
    spec's); in train mode dropout masks are drawn once and every pass uses the same ones.
    ``engine``: the exact engine (:data:`EXACT_ENGINES`, :func:`exact_backend`).
    ``progress``: a ``refnet.progress.Reporter`` told of every tensor checked (default silent).

    Where the FD vectors run (the report is the same, timings aside): ``jobs=1`` in this
    process; ``jobs=N`` on a pool of N spawned worker processes, each initialized once with the
    problem (so, as with any multiprocessing, a script must guard its entry point with
    ``if __name__ == "__main__":``); ``jobs=None`` (default) on every core
    (:func:`available_cores`) when the FD work exceeds :data:`POOL_MIN_WORK`, else in this
    process. ``executor``: any ``concurrent.futures.Executor`` instead (a
    ``ThreadPoolExecutor``, ``dask.distributed.Client(...).get_executor()``, ...): every task
    then carries the whole problem (model spec, float64 parameters and input, the dropout
    masks), which each worker builds once and keeps under the payload's digest. Workers rebuild
    the model from its spec. The float64 FD column is computed by the workers' BLAS: on
    machines whose BLAS sums in another order its last bits may differ (as the ulp columns do).

    Ctrl-C raises ``refnet.progress.Interrupted`` whose ``partial`` is the Report of the tensors
    finished, marked ``incomplete`` and not passed (None if none was); the FD vectors not yet
    run are cancelled and the pool's workers are shut down.
    """
    began = time.perf_counter()
    if mode not in ("auto", "element", "direction"):
        raise ValueError(f"verify: mode must be auto, element or direction, got {mode!r}")
    if engine not in EXACT_ENGINES:
        raise ValueError(f"verify: engine must be one of {', '.join(EXACT_ENGINES)}, "
                         f"got {engine!r}")
    _check_jobs(jobs, executor)
    params, x, y = model.prepare(params, x, y)
    learnable = list(model.param_shapes())
    total = x.size + sum(params[name].size for name in learnable)
    if mode == "auto":
        mode = "element" if total <= max_elementwise else "direction"

    progress = SILENT if progress is None else progress
    names = learnable + ["x"]
    n_checks = total if mode == "element" else directions * len(names)
    tensors, futures, pool = [], [], None
    timings = {"float64_and_bound": 0.0, "exact": 0.0, "fd_exact": 0.0, "fd_float64": 0.0}
    description = ""

    def report(passed, global_kinks, incomplete=None):
        return Report(passed, float(g64.loss), dps, digits, mode, first.train, tensors,
                      global_kinks, incomplete=incomplete, engine=description,
                      timings={**timings, "total": time.perf_counter() - began})

    progress.start(len(names), "tensors")
    try:
        progress.update(0, "the float64 and error-bound passes")
        t = time.perf_counter()
        first = model.default_state(train)
        g64 = model.loss_and_grads(FLOAT64, params, x, y, first)     # draws the dropout masks
        problem = _Problem(model, params, x, y, first, engine=engine)
        gb = model.loss_and_grads(BOUND, params, x, y, problem.replay())
        timings["float64_and_bound"] = time.perf_counter() - t
        progress.update(0, f"the {dps}-digit pass")
        t = time.perf_counter()
        mp, gm, refusal = _exact_run(
            engine, exact_backend(dps, engine, problem.size),
            lambda bk: model.loss_and_grads(bk, params, x, y, problem.replay()),
            lambda: exact_backend(dps, "mpmath"))
        description = _engine_description(mp)
        if refusal is not None:
            # Beyond the engine's range: the reference engine, here and in every FD check.
            description += f" (the expansion engine refused: {refusal})"
            engine = problem.engine = "mpmath"
        timings["exact"] = time.perf_counter() - t

        loss_mp = gm.loss
        loss_abs = abs(float(_scalar(loss_mp))) or 1e-300
        global_kinks = []
        base_signatures = gm.forward.kink_signatures
        branch = _signature_difference(g64.forward.kink_signatures, base_signatures,
                                       problem.labels)
        if branch:
            global_kinks.append(f"float64 and exact take different branches at {branch}")

        # Where the FD vectors run.
        if executor is None:
            workers = available_cores() if jobs is None else jobs
            if jobs is None and n_checks * _forward_values(model, params, x) < POOL_MIN_WORK:
                workers = 1
            workers = min(workers, n_checks)
        if executor is not None or workers > 1:
            payload = _Payload(model.spec, params, x, y, first.train, dict(first.masks),
                               base_signatures, engine, problem.prefix_cache)
            key = payload.key()
            if executor is not None:
                submit = lambda task: executor.submit(_fd_task, key, payload, task)  # noqa: E731
            else:
                pool = ProcessPoolExecutor(workers, mp_context=_WorkerContext(),
                                           initializer=_init_worker, initargs=(key, payload))
                submit = lambda task: pool.submit(_fd_task, key, None, task)  # noqa: E731
        else:
            submit = None

        # The directions, drawn in the order of a one-process run; each tensor's vectors
        # submitted at once (in this process: deferred until its tensor is checked).
        progress.update(0, f"the finite differences ({n_checks} checks"
                           + (f", {workers} processes)" if executor is None and workers > 1
                              else ")"))
        rng = np.random.default_rng(seed)
        plan = []
        for name in names:
            f64 = np.asarray(g64.params[name] if name != "x" else g64.x, dtype=np.float64)
            # The bound is computed by the BoundBackend, whose values are those of float64 bit
            # for bit (a test checks); the result held to it is the float64 backend's own.
            bound_arr = gb.params[name] if name != "x" else gb.x
            exact = gm.params[name] if name != "x" else gm.x
            base = problem.base(name)
            h64 = U64 ** (1 / 3) * max(1.0, float(np.max(np.abs(base))) if base.size else 1.0)
            prepare = _Preparer(mp, name, exact, bound_arr.sigma, digits, loss_abs)
            vectors = list(_fd_vectors(mode, f64.shape, directions, rng))
            if submit is None:
                fd = [_Deferred(lambda v, p=prepare: _fd_vector(problem, p(v), base_signatures),
                                v) for v in vectors]
            else:
                fd = [submit(prepare(v)) for v in vectors]
            futures += fd
            plan.append((name, f64, bound_arr, exact, vectors, fd, h64))

        for name, f64, bound_arr, exact, vectors, fd, h64 in plan:
            bound = np.minimum(bound_arr.e, bound_arr.probabilistic_bound(LAMBDA))
            tensors.append(_check_tensor(name, f64, bound, bound_arr.e, exact, mp, problem,
                                         float(g64.loss), mode, vectors, fd, h64, digits,
                                         ulp_kink=bool(branch), timings=timings))
            progress.update(len(tensors), f"{name} {'ok' if tensors[-1].passed else 'FAIL'}")
    except KeyboardInterrupt as stop:
        _cancel(futures, pool)
        # Keep the tensors finished; the one being checked is dropped. Before the first one
        # there is nothing to report.
        done = len(tensors)
        if not done:
            raise Interrupted(f"interrupted before the first of {len(names)} gradient tensors "
                              f"was checked", None, 0, len(names)
                              ).with_traceback(stop.__traceback__) from None
        message = f"interrupted after {done} of {len(names)} gradient tensors"
        partial = report(False, global_kinks,
                         incomplete=f"{message}; not checked: {', '.join(names[done:])}")
        raise Interrupted(message, partial, done, len(names)
                          ).with_traceback(stop.__traceback__) from None
    finally:
        _cancel(futures, pool)
        progress.close()

    return report(all(t.passed for t in tensors), global_kinks)


def _cancel(futures, pool):
    """What has not run is not run: pending futures cancelled, the pool's workers joined (each
    finishes the one vector it may be on; nothing is left running)."""
    for f in futures:
        if not f.done():
            f.cancel()
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


class _Preparer:
    """The parent's part of an FD vector of one tensor: the exact analytic directional
    derivative and the scale agreement is counted against, at the ``dps``-digit run."""

    def __init__(self, mp, name, exact, sigma, required, loss_abs):
        self.mp, self.name, self.exact, self.sigma = mp, name, exact, sigma
        self.required, self.loss_abs = required, loss_abs

    def __call__(self, v) -> _FDTask:
        mp = self.mp
        terms = self.exact * mp.asarray(v)
        analytic = _scalar(mp.sum(terms))
        # Σ|g_i·v_i|: rounding to nearest is symmetric in sign, so |g_i·v_i| rounded is
        # |g_i|·|v_i| rounded, bit for bit — one product per element, not two.
        scale = _scalar(mp.sum(mp.abs(terms)))
        # The exact analytic value carries rounding noise of about M·10^-dps, M the magnitude of
        # the terms it was formed from (σ/u of the float64 analysis). A gradient that cancels to
        # (nearly) zero — the bias before a BatchNorm — is compared relative to M·10^-(dps −
        # required − 5) instead of to its own noise.
        magnitude = float(np.sum(self.sigma / U64 * np.abs(v)))
        floor = magnitude * 10.0 ** -(mp.dps - self.required - 5)
        if floor > float(scale):
            scale = mp.ctx.mpf(floor)
        return _FDTask(self.name, v, _exact_pair(analytic), _exact_pair(scale), float(scale),
                       self.loss_abs)


def _check_tensor(name, f64, bound, rigorous, exact, mp, problem, loss64, mode, vectors, fd,
                  h64, required, ulp_kink, timings):
    """Check 1 of one tensor; check 2 gathered from its FD vectors' results ``fd`` (futures, in
    the order of ``vectors``); check 3 along the same vectors (``h64`` the float64 step)."""
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
    fd_digits, fd_dps, fd_kinks, checks = math.inf, 0, 0, 0
    fd64_rel, fd64_noise = 0.0, 0.0
    kink_notes = []
    for v, future in zip(vectors, fd):
        r = future.result()
        checks += 1
        timings["fd_exact"] += r.seconds
        fd_dps = max(fd_dps, r.dps)
        if r.kink:
            fd_kinks += 1
            if len(kink_notes) < 3:
                kink_notes.append(r.kink)
        else:
            fd_digits = min(fd_digits, r.digits)
        # float64 FD along the same vector
        t = time.perf_counter()
        fd64 = _fd64(problem, name, v, h64)
        timings["fd_float64"] += time.perf_counter() - t
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


def _central_pair(problem, bk, name, v, h):
    """L(θ + h v) and L(θ − h v) with their kink signatures, in ``bk``."""
    point = problem.converted_base(bk, name)
    step = bk.asarray(v) * bk.ctx.mpf(h)
    lp, sig_p = problem.loss(bk, name, point + step)
    lm, sig_m = problem.loss(bk, name, point - step)
    return lp, sig_p, lm, sig_m


def _fd_check(problem, name, v, analytic, scale, s, loss_abs, base_signatures):
    """One high-precision central difference along v: (digits, dps, kink note or None).
    ``analytic``, ``scale``: exact (m, e) pairs; ``s``: the scale in float64."""
    if s > 0:
        h = FD_STEP * min(1.0, loss_abs / s)
        # Digits to resolve L(θ ± hv) − L(θ) ≈ h·s to FD_TARGET_DIGITS, plus guard digits.
        # (In logarithms where h·s underflows: a gradient of 1e-299.)
        lost = (math.log10(loss_abs / (h * s)) if h * s > 1e-300
                else math.log10(loss_abs) - math.log10(h) - math.log10(s))
        dps = FD_TARGET_DIGITS + FD_GUARD_DIGITS + max(0, math.ceil(lost))
    else:
        h = FD_STEP
        dps = FD_TARGET_DIGITS + FD_GUARD_DIGITS + 2 * FD_TARGET_DIGITS
    dps = min(dps, MAX_FD_DPS)
    bk, (lp, sig_p, lm, sig_m), _ = _exact_run(
        problem.engine, problem.mp(dps), lambda b: _central_pair(problem, b, name, v, h),
        lambda: problem.fallback(dps))
    ctx = bk.ctx
    crossing = (_signature_difference(base_signatures, sig_p, problem.labels)
                or _signature_difference(base_signatures, sig_m, problem.labels))
    if crossing:
        return math.nan, dps, f"FD step crosses a kink at {crossing}"
    fd = (_scalar(lp) - _scalar(lm)) / (2 * ctx.mpf(h))
    a = ctx.mpf(analytic)
    if s > 0:
        ref = ctx.mpf(scale)
    else:
        # No gradient along v: FD must vanish to the rounding level of the loss at this dps.
        ref = ctx.mpf(loss_abs) * ctx.mpf(10) ** (-(dps - FD_TARGET_DIGITS)) / ctx.mpf(h)
    d = _digits(ctx, abs(fd - a), ref)
    return min(d, float(dps)), dps, None


@dataclass
class SpotCheck:
    """Check 1 of the triangle alone: float64 vs the ``dps``-digit run, every gradient element
    held to min(e, LAMBDA·σ). ``passed`` is None where float64 and the exact run take different
    branches at a kink (nothing to compare); ``worst_use`` is max err/bound (≤ 1 passes)."""
    passed: Optional[bool]
    worst_use: float
    dps: int


def spot_check(model: Model, params, x, y, *, dps: int = 30,
               train: Optional[bool] = None, engine: str = "auto") -> SpotCheck:
    """float64 gradients of (params, x, y) checked against the high-precision backend — the
    cheap part of :func:`verify` (no finite differences), for sweeps such as ``refnet study``.
    ``engine``: the exact engine (:func:`exact_backend`)."""
    params, x, y = model.prepare(params, x, y)
    first = model.default_state(train)
    g64 = model.loss_and_grads(FLOAT64, params, x, y, first)
    replay = lambda: ForwardState(train=first.train, rng=None, masks=first.masks)  # noqa: E731
    gb = model.loss_and_grads(BOUND, params, x, y, replay())
    mp, gm, _ = _exact_run(engine, exact_backend(dps, engine, largest_tensor(model, params, x)),
                           lambda bk: model.loss_and_grads(bk, params, x, y, replay()),
                           lambda: exact_backend(dps, "mpmath"))
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
