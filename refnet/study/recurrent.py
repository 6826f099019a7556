"""The recurrent study (``refnet study --recurrent``): gradients through time in recurrent nets —
rnn-tanh, rnn-relu, lstm and gru × sequence length × spectral radius of W_hh × init, each
configuration measured step by step in float64 and in fp16, judged, and spot-checked; and the
effect of clipping by global norm on an exploding RNN's training (Pascanu et al. 2013).

A configuration is one recurrent layer of hidden size 16 reading a seeded batch of 16 sequences
of length T (x_t ~ N(0, 1), 4 features), its last output (``"output": "last"``) into a Linear
16 → 2, and mse against random targets. The loss enters at the last step only, so ‖∂L/∂h_t‖
measures how much of it reaches step t through time: with ∂L/∂h_{T−1} = g,
∂L/∂h_t = (∂h_{T−1}/∂h_t)ᵀ g, nothing added on the way (a named choice: ``"output":
"sequence"`` would add each step's own loss term and hide the propagation).

Cells: ``rnn-tanh``, ``rnn-relu`` (nn.RNN with that nonlinearity), ``lstm``, ``gru`` (torch's
nn.LSTM and nn.GRU; no forget-gate bias option: torch's default). Inits (W_ih and W_hh; biases
torch's default U(−1/√H, 1/√H)): ``uniform`` = torch's default U(−1/√H, 1/√H), ``orthogonal`` =
torch's orthogonal_ (gain 1) on each whole tensor. Then W_hh is set to the configuration's
spectral radius ρ (:func:`set_spectral_radius`): each of its gate blocks (H, H) — rnn's one,
lstm's W_hi, W_hf, W_hg, W_ho, gru's W_hr, W_hz, W_hn — is multiplied by ρ/ρ(block), ρ(block) =
max |eigenvalue| measured with numpy (a named choice: every gate's recurrent matrix gets the
radius, not just the candidate's). The radii after scaling are recorded (``radius_measured``),
and each block's spectral norm ‖·‖₂ (``norm_hh``): for the rnn's orthogonal W_hh the two are
equal, for a uniform block ‖·‖₂ is 1.5–2ρ (a non-normal matrix; the blocks of an orthogonal
lstm or gru tensor are not orthogonal either) — the difference between the rigorous bound and
the asymptotic rate of ``spec/theory.md``.

Precisions: ``float64``, and ``fp16`` = ``Precision("fp16", "autocast")`` without a loss scaler,
under which torch runs the recurrent kernel in fp16 (``spec/precision.md``): each step's
∂L/∂h_t is stored in fp16 between steps, so a gradient that vanishes through time underflows to
exactly 0 from some step back (``step_underflow``, ``dead_steps``).

Measured per configuration and precision (``refnet.lowp.diagnose``, whose shadow records every
step): ``step_norms`` ‖∂L/∂h_t‖₂ over the batch for t = 0 … T−1 (and ``cell_norms`` ‖∂L/∂c_t‖₂
for lstm); ``ratio`` = ‖∂L/∂h_0‖ / ‖∂L/∂h_{T−1}‖ (the earliest step over the one the loss
enters); ``grad_norms`` ‖∂L/∂θ‖ of every parameter; in fp16 the fraction of each step's
∂L/∂h_t elements that are 0 where float64's are not; ``spot_checked``: the float64 gradients of
the model on 2 of its sequences lie within ``refnet verify``'s error bound of the 30-digit
reference.

The verdict (:func:`judge_through_time`), with the thresholds of the feed-forward study
(``grid.RATIO_RANGE``, ``grid.NORM_RANGE``) read through time:

1. ``nonfinite`` — the loss, a parameter gradient or a step's ∂L/∂h_t is inf or NaN;
2. ``exploding`` — ratio > 1e3, else ``vanishing`` — ratio < 1e-3 (or ∂L/∂h_0 is exactly 0);
3. otherwise ``exploding`` if a parameter gradient's norm > 1e3, ``vanishing`` if one's < 1e-6;
4. otherwise ``healthy``.

Clipping (:func:`clipping_experiment`): the rnn-relu of T = 50 at ρ = 1.25 (uniform init), full
batch SGD at lr 0.1 for 200 steps (100 with ``--quick``), once as is and once with
``clip_grad_norm`` at max_norm 1 (``refnet.training``: torch's rule, clip after backward, before
the step); the loss and the global gradient norm (before clipping) of every step.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..lowp.diagnose import diagnose
from ..lowp.emulation import Precision
from ..model import Model
from ..progress import SILENT, Reporter
from ..training.loop import train
from ..training.optim import make_optimizer
from ..verification.triangle import spot_check
from .grid import SPOT_CHECK_DPS, _fmt, judge_profile, run_grid, sparkline

HIDDEN, FEATURES, BATCH, OUT = 16, 4, 16, 2
SPOT_CHECK_SAMPLES = 2          # sequences per spot check (the grid's MLPs use 4; T = 200
#                                 LSTMs at 30 digits cost ~2 s per 2 sequences)
CELLS = {"rnn-tanh": {"type": "rnn", "nonlinearity": "tanh"},
         "rnn-relu": {"type": "rnn", "nonlinearity": "relu"},
         "lstm": {"type": "lstm"}, "gru": {"type": "gru"}}
INITS = {"uniform": "torch_default", "orthogonal": "orthogonal"}
PRECISIONS = ("float64", "fp16")
FULL_LENGTHS = (10, 25, 50, 100, 200)
FULL_RADII = (0.5, 0.75, 1.0, 1.25, 1.5)

QUICK = {"cells": tuple(CELLS), "inits": ("uniform",), "lengths": (10, 100),
         "radii": (0.5, 1.0, 1.5)}
FULL = {"cells": tuple(CELLS), "inits": tuple(INITS), "lengths": FULL_LENGTHS,
        "radii": FULL_RADII}

CLIPPING = {"cell": "rnn-relu", "init": "uniform", "length": 50, "radius": 1.25,
            "optimizer": "sgd", "lr": 0.1, "steps": 200, "quick_steps": 100, "max_norm": 1.0}


@dataclass
class RecurrentConfig:
    cell: str
    init: str
    length: int
    radius: float

    def spec(self) -> dict:
        layer = {**CELLS[self.cell], "hidden_size": HIDDEN, "output": "last",
                 "init": INITS[self.init]}
        return {"input_shape": [self.length, FEATURES], "seed": 0, "batch": BATCH,
                "layers": [layer, {"type": "dense", "out": OUT}], "loss": {"type": "mse"},
                "name": f"{self.cell}/{self.init}/T {self.length}/rho {self.radius:g}"}


@dataclass
class RecurrentResult:
    cell: str
    init: str
    length: int
    radius: float
    precision: str
    verdict: str
    reason: str
    ratio: Optional[float]
    step_norms: List[Optional[float]]
    cell_norms: List[Optional[float]] = field(default_factory=list)
    grad_norms: Dict[str, Optional[float]] = field(default_factory=dict)
    radius_measured: List[float] = field(default_factory=list)
    norm_hh: List[float] = field(default_factory=list)
    step_underflow: List[float] = field(default_factory=list)
    dead_steps: Optional[int] = None
    fp16_underflow: Optional[float] = None
    loss: Optional[float] = None
    spot_checked: Optional[bool] = None
    spot_check_use: Optional[float] = None


def set_spectral_radius(model: Model, params, radius: float):
    """``params`` with every ``weight_hh_l<k>`` of the model's top-level recurrent layers scaled
    gate block by gate block to spectral radius ``radius`` (module docstring); returns (params,
    [ρ of each block after scaling], [‖block‖₂ after scaling]), blocks in layer, k, gate order."""
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"spectral radius must be a positive finite number, got {radius!r}")
    params = dict(params)
    radii, norms = [], []
    for i, layer in enumerate(model.layers):
        if layer.type not in ("rnn", "lstm", "gru"):
            continue
        h = layer.hidden
        for k in range(layer.num_layers):
            name = f"{i}.weight_hh_l{k}"
            w = np.array(params[name], dtype=np.float64)
            for g in range(layer.gates):
                block = w[g * h:(g + 1) * h]
                rho = float(np.max(np.abs(np.linalg.eigvals(block))))
                if rho == 0:
                    raise ValueError(f"{name}: gate block {g} has spectral radius 0; it cannot "
                                     f"be scaled to {radius}")
                w[g * h:(g + 1) * h] = block * (radius / rho)
                scaled = w[g * h:(g + 1) * h]
                radii.append(float(np.max(np.abs(np.linalg.eigvals(scaled)))))
                norms.append(float(np.linalg.norm(scaled, 2)))
            params[name] = w
    if not radii:
        raise ValueError("set_spectral_radius: the model has no top-level rnn, lstm or gru layer")
    return params, radii, norms


def judge_through_time(step_norms: List[float], grad_norms: List[float], finite: bool):
    """(verdict, reason) from ‖∂L/∂h_t‖ for t = 0 … T−1 and the parameter-gradient norms."""
    return judge_profile(
        (step_norms[0], step_norms[-1]), grad_norms, finite, ratio="|dL/dh_0| / |dL/dh_T-1|",
        size="a parameter gradient's norm",
        nonfinite="the loss, a gradient or a step's dL/dh_t is inf/NaN",
        all_zero="every step's gradient is 0",
        healthy=lambda r, bottom, top: (f"|dL/dh_0| / |dL/dh_T-1| = {r:.1e}, parameter gradient "
                                        f"norms in [{bottom:.1e}, {top:.1e}]"))


def _finite_or_none(values):
    return [v if math.isfinite(v) else None for v in values]


def measure_recurrent(config: RecurrentConfig, precisions=PRECISIONS,
                      check: bool = True) -> List[RecurrentResult]:
    """One model, one RecurrentResult per precision (one diagnose pass gives the float64
    shadow and the fp16 run; the spot check is shared)."""
    model = Model(config.spec())
    params, x, y = model.prepare()
    params, radii, norms = set_spectral_radius(model, params, config.radius)
    low = Precision("fp16", "autocast") if "fp16" in precisions else Precision("float64")
    with np.errstate(all="ignore"):
        d = diagnose(model, low, params, x, y)
    spot = None
    if check:
        with np.errstate(all="ignore"):
            spot = spot_check(model, params, x[:SPOT_CHECK_SAMPLES], y[:SPOT_CHECK_SAMPLES],
                              dps=SPOT_CHECK_DPS)
    grads = [t for t in d.tensors if t.kind == "param_grad"]
    dh = next(p for p in d.steps if p.kind == "dh" and p.k == 0)
    dc = next((p for p in d.steps if p.kind == "dc" and p.k == 0), None)
    results = []
    for precision in precisions:
        f64 = precision == "float64"
        steps = dh.norm_float64 if f64 else dh.norm
        cells = [] if dc is None else (dc.norm_float64 if f64 else dc.norm)
        grad_norms = {t.name: (t.norm_float64 if f64 else t.norm) for t in grads}
        loss = d.loss_float64 if f64 else d.loss
        finite = (math.isfinite(loss) and all(math.isfinite(v) for v in grad_norms.values())
                  and all(math.isfinite(v) for v in steps + cells))
        verdict, reason = judge_through_time(steps, list(grad_norms.values()), finite)
        ratio = steps[0] / steps[-1] if steps[-1] > 0 and math.isfinite(steps[0]) \
            and math.isfinite(steps[-1]) else None
        fp16 = {}
        if not f64:
            under = [u / dh.numel for u in dh.underflow]
            fp16 = {"step_underflow": under,
                    "dead_steps": sum(1 for u in dh.underflow if u == dh.numel),
                    "fp16_underflow": 100.0 * sum(dh.underflow) / (dh.numel * len(steps))}
        results.append(RecurrentResult(
            config.cell, config.init, config.length, config.radius, precision, verdict,
            reason, ratio, _finite_or_none(steps), _finite_or_none(cells),
            {k: (v if math.isfinite(v) else None) for k, v in grad_norms.items()},
            radii, norms, loss=loss if math.isfinite(loss) else None,
            spot_checked=None if spot is None else spot.passed,
            spot_check_use=None if spot is None or not math.isfinite(spot.worst_use)
            else spot.worst_use, **fp16))
    return results


def recurrent_grid(quick: bool) -> List[RecurrentConfig]:
    g = QUICK if quick else FULL
    return [RecurrentConfig(c, i, t, r) for c, i, t, r in
            product(g["cells"], g["inits"], g["lengths"], g["radii"])]


# --- clipping ---------------------------------------------------------------------------------

@dataclass
class ClippingRun:
    max_norm: Optional[float]
    loss: List[Optional[float]]           # per step, before the step's update
    grad_norm: List[Optional[float]]      # the global norm ‖∂L/∂θ‖₂ before clipping
    stopped: Optional[str]
    steps_done: int


@dataclass
class ClippingResult:
    settings: dict
    unclipped: ClippingRun
    clipped: ClippingRun


def clipping_experiment(quick: bool = True, steps: Optional[int] = None) -> ClippingResult:
    """The exploding RNN of ``CLIPPING`` trained with and without clipping by global norm."""
    s = dict(CLIPPING)
    s["steps"] = steps if steps is not None else (s["quick_steps"] if quick else s["steps"])
    model = Model(RecurrentConfig(s["cell"], s["init"], s["length"], s["radius"]).spec())
    params, x, y = model.prepare()
    params, radii, norms = set_spectral_radius(model, params, s["radius"])
    s.update(radius_measured=radii[0], norm_hh=norms[0])
    runs = []
    for max_norm in (None, s["max_norm"]):
        with np.errstate(all="ignore"):
            r = train(model, params, x, y, make_optimizer(s["optimizer"], s["lr"]), s["steps"],
                      clip_norm=max_norm)
        runs.append(ClippingRun(max_norm, _finite_or_none([h["loss"] for h in r.history]),
                                _finite_or_none([h["total_grad_norm"] for h in r.history]),
                                r.stopped, r.steps_done))
    return ClippingResult(s, *runs)


# --- the run ----------------------------------------------------------------------------------

def run_recurrent_study(quick: bool = True, out: Optional[Path] = None, check: bool = True,
                        progress=None, configs: Optional[List[RecurrentConfig]] = None,
                        precisions=PRECISIONS, executor=None, clipping: bool = True):
    """Measure every configuration and run the clipping experiment; write recurrent.json,
    recurrent.csv, recurrent-clipping.json and (with matplotlib) the figures to ``out``.
    Returns (rows, ClippingResult or None). ``progress``, Ctrl-C and ``executor`` as
    ``refnet.study.grid.run_study``: an interrupted run raises ``Interrupted`` whose
    ``partial`` is the finished rows, first written to recurrent.partial.json/.csv."""
    configs = recurrent_grid(quick) if configs is None else configs
    if progress is True:
        progress = Reporter(name="refnet study --recurrent")
    extra = ("clipping experiment", lambda: clipping_experiment(quick)) if clipping else None
    return run_grid(configs, measure_recurrent, precisions, check, progress or SILENT, executor,
                    out, lambda rows, clip, path, partial: write_recurrent_outputs(
                        rows, clip, path, partial=partial), extra)


# --- output -----------------------------------------------------------------------------------

def format_recurrent_table(results: List[RecurrentResult], max_spark: int = 24) -> str:
    header = (f"{'cell':<9} {'init':<10} {'T':>4} {'rho':>5} {'prec':<7} {'verdict':<9} "
              f"{'t0/tlast':>8} {'|dL/dh_t|, t = 0 → T-1':<{max_spark}} {'f16 dead':>8} "
              f"{'f16 unf%':>8} ref")
    lines = [header, "-" * len(header)]
    for r in results:
        spark = sparkline(r.step_norms)
        if len(spark) > max_spark:
            spark = spark[::math.ceil(len(spark) / max_spark)]
        check = {True: "✓", False: "✗", None: "k"}[r.spot_checked] if r.spot_check_use \
            is not None or r.spot_checked is not None else "·"
        lines.append(
            f"{r.cell:<9} {r.init:<10} {r.length:>4} {r.radius:>5g} {r.precision:<7} "
            f"{r.verdict:<9} {_fmt(r.ratio, '8.1e')} {spark:<{max_spark}} "
            f"{_fmt(r.dead_steps, '8d')} {_fmt(r.fp16_underflow, '8.2f')} {check}")
    return "\n".join(lines)


def recurrent_summary(results: List[RecurrentResult], clip: Optional[ClippingResult]) -> str:
    """Per cell at the longest length: the float64 verdict at each radius; fp16's lost steps;
    the clipping experiment; the spot checks."""
    longest = max(r.length for r in results)
    lines = [f"Through time at T = {longest} (float64; |dL/dh_0| / |dL/dh_T-1|):"]
    for cell in dict.fromkeys(r.cell for r in results):
        for init in dict.fromkeys(r.init for r in results):
            rows = [r for r in results if r.cell == cell and r.init == init
                    and r.length == longest and r.precision == "float64"]
            if rows:
                lines.append(f"  {cell} + {init}: " + ", ".join(
                    f"rho {r.radius:g} {r.verdict} ({_fmt(r.ratio, '.0e')})" for r in rows))
    dead = [r for r in results if r.precision == "fp16" and r.dead_steps]
    if dead:
        worst = max(dead, key=lambda r: r.dead_steps)
        lines.append(f"fp16 (autocast, no loss scaling): {len(dead)} configurations lose whole "
                     f"steps of dL/dh_t to underflow; most: {worst.cell} + {worst.init}, T = "
                     f"{worst.length}, rho {worst.radius:g}: {worst.dead_steps} of "
                     f"{worst.length} steps entirely 0")
    if clip is not None:
        s = clip.settings
        lines.append(f"Clipping (Pascanu et al. 2013): {s['cell']} + {s['init']}, T = "
                     f"{s['length']}, rho {s['radius']:g} (||W_hh||_2 {s['norm_hh']:.2f}), "
                     f"{s['optimizer']} lr {s['lr']:g}, {s['steps']} steps:")
        for run in (clip.unclipped, clip.clipped):
            label = "without clipping" if run.max_norm is None else \
                f"clip-norm {run.max_norm:g}"
            start = _fmt(run.loss[0], '.3g')
            if run.stopped:
                lines.append(f"  {label}: loss {start}, then {run.stopped}")
            else:
                finite = [v for v in run.loss if v is not None]
                lines.append(f"  {label}: loss {start} -> {_fmt(run.loss[-1], '.3g')} after "
                             f"{run.steps_done} steps (lowest {min(finite):.3g})")
    checked = [r for r in results if r.precision == "float64" and r.spot_checked is not None]
    failed = [r for r in checked if not r.spot_checked]
    lines.append(f"Spot checks against the {SPOT_CHECK_DPS}-digit reference: {len(checked)} "
                 f"models, {len(failed)} failed")
    return "\n".join(lines)


def _floats(values):
    return " ".join(_fmt(v, ".3e") for v in values)


def write_recurrent_outputs(results: List[RecurrentResult], clip: Optional[ClippingResult],
                            out: Path, partial: bool = False) -> List[Path]:
    """recurrent.json, recurrent.csv, recurrent-clipping.json and the figures; ``partial``:
    the rows of an interrupted run as recurrent.partial.json/.csv, nothing else. A complete
    run removes the partial files an earlier interrupted one left."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "recurrent.partial" if partial else "recurrent"
    rows = [asdict(r) for r in results]
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    columns = ["cell", "init", "length", "radius", "precision", "verdict", "reason", "ratio",
               "loss", "dead_steps", "fp16_underflow", "spot_checked", "radius_measured",
               "norm_hh", "step_norms"]
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_floats(row[c]) if isinstance(row[c], list) else row[c]
                             for c in columns])
    written = [out / f"{stem}.json", out / f"{stem}.csv"]
    if partial:
        return written
    for stale in ("recurrent.partial.json", "recurrent.partial.csv"):
        (out / stale).unlink(missing_ok=True)
    if clip is not None:
        (out / "recurrent-clipping.json").write_text(json.dumps(asdict(clip), indent=1))
        written.append(out / "recurrent-clipping.json")
    try:
        from .plots import recurrent_figures
    except ImportError:           # matplotlib is the optional "plot" extra
        return written
    return written + recurrent_figures(results, clip, out)
