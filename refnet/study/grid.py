"""The gradient-health study: the classic grid of depth × activation × init × architecture ×
precision, each configuration measured, judged and spot-checked (``refnet study``).

A configuration is an MLP of ``depth`` hidden layers of width 32 on a seeded batch of 64
samples (x ~ N(0, 1) of width 32, 10 random classes, cross-entropy), the last Linear 32 → 10:

==========  ==============================================================================
plain       [dense → act] × depth → dense
batchnorm   [dense → batchnorm → act] × depth → dense          (train mode: batch statistics)
residual    [residual(body = [dense → act]), identity shortcut] × depth → dense
==========  ==============================================================================

Inits (weights; biases 0): ``normal-0.01`` N(0, 0.01²), ``normal-1`` N(0, 1), ``xavier``
(xavier_normal, gain 1), ``kaiming`` (kaiming_normal, fan_in, gain √2 — torch's relu gain, used
for every activation as a named choice), ``lecun`` (lecun_normal: std 1/√fan_in),
``orthogonal`` (torch's orthogonal_, gain 1). The output layer gets the same init.

Precisions: ``float64``, and ``fp16`` = the GPU's mixed precision without a loss scaler
(``Precision("fp16", "autocast")``, ``refnet.lowp.emulation``), accounted against the float64 run.

Measured per configuration (in its precision):

- ``grad_norms``: ‖∂L/∂W_l‖ (Frobenius) of every dense weight, input side first;
- ``ratio``: first / last of those (the first hidden layer over the output layer);
- ``forward_var``: the variance of each hidden activation's output over batch and units (float64);
- ``dead``: mean over relu-type layers of the fraction of units whose output is 0 for every sample
  (``refnet.training.dead_fractions``); ``saturated``: for sigmoid/tanh, the fraction of outputs
  with σ'(z) < 0.01·σ'(0) (|z| > 6.9 for sigmoid, |z| > 3.0 for tanh: the unit passes on under 1 %
  of what it would at 0), measured on the outputs h: σ ∉ [0.001, 0.999], |tanh| > 0.995;
- ``fp16_overflow``, ``fp16_underflow``: percent of all activation and gradient elements that
  overflow / underflow in fp16 (against float64; ``refnet.lowp.diagnose``), and per layer for the map;
- ``spot_checked``: the float64 gradients of this model on 4 of its samples agree with the
  30-digit reference within the error bound of ``refnet verify`` (``verify.spot_check``); ``None``
  where float64 and the reference take different branches of a kink.

The verdict, with the thresholds it uses (the common rule of thumb for a healthy gradient norm
is roughly [1e-6, 1e3]; across depth, three decades of first/last ratio):

1. ``nonfinite`` — the loss or any gradient is inf or NaN;
2. ``exploding`` — ratio > 1e3, else ``vanishing`` — ratio < 1e-3;
3. otherwise ``exploding`` if some layer's norm > 1e3, ``vanishing`` if some layer's norm < 1e-6
   (zero included: an underflowed fp16 gradient);
4. otherwise ``healthy``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..lowp.diagnose import diagnose, l2_norm
from ..lowp.emulation import Precision
from ..model import Model
from ..numerics.backend import FLOAT64
from ..progress import SILENT, Interrupted, Reporter
from ..training.loop import dead_fractions
from ..verification.triangle import spot_check

WIDTH, BATCH, CLASSES = 32, 64, 10
NORM_RANGE = (1e-6, 1e3)
RATIO_RANGE = (1e-3, 1e3)
SPOT_CHECK_SAMPLES, SPOT_CHECK_DPS = 4, 30
LOG_LINES = 10          # progress in a log: a line per tenth of the grid

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu")
INITS = {
    "normal-0.01": {"name": "normal", "std": 0.01},
    "normal-1": {"name": "normal", "std": 1.0},
    "xavier": "xavier_normal",
    "kaiming": {"name": "kaiming_normal", "nonlinearity": "relu"},
    "lecun": "lecun_normal",
    "orthogonal": "orthogonal",
}
ARCHS = ("plain", "batchnorm", "residual")
PRECISIONS = ("float64", "fp16")
FULL_DEPTHS = (2, 5, 10, 20, 50)

QUICK = {"activations": ("sigmoid", "tanh", "relu", "selu"),
         "inits": ("normal-0.01", "normal-1", "xavier", "kaiming", "lecun"),
         "archs": ARCHS, "depths": (3, 12), "precisions": PRECISIONS}
FULL = {"activations": ACTIVATIONS, "inits": tuple(INITS), "archs": ARCHS,
        "depths": FULL_DEPTHS, "precisions": PRECISIONS}

VERDICTS = ("healthy", "vanishing", "exploding", "nonfinite")
RELU_TYPES = ("relu", "leaky_relu", "prelu")


@dataclass
class Config:
    activation: str
    init: str
    depth: int
    arch: str

    def spec(self) -> dict:
        init = INITS[self.init]
        dense = {"type": "dense", "out": WIDTH, "init": init, "bias_init": "zeros"}
        act = {"type": self.activation}
        layers = []
        for _ in range(self.depth):
            if self.arch == "plain":
                layers += [dense, act]
            elif self.arch == "batchnorm":
                layers += [dense, {"type": "batchnorm"}, act]
            else:
                layers.append({"type": "residual", "body": [dense, act]})
        layers.append({**dense, "out": CLASSES})
        return {"input_shape": [WIDTH], "seed": 0, "batch": BATCH, "layers": layers,
                "loss": {"type": "softmax_cross_entropy"},
                "name": f"{self.activation}/{self.init}/{self.arch}/depth {self.depth}"}


@dataclass
class Result:
    activation: str
    init: str
    depth: int
    arch: str
    precision: str
    verdict: str
    reason: str
    ratio: Optional[float]
    grad_norms: List[Optional[float]]
    forward_var: List[float]
    dead: Optional[float]
    saturated: Optional[float]
    fp16_overflow: Optional[float]
    fp16_underflow: Optional[float]
    fp16_layers: List[dict] = field(default_factory=list)
    loss: Optional[float] = None
    spot_checked: Optional[bool] = None
    spot_check_use: Optional[float] = None


def judge(norms: List[float], finite: bool):
    """(verdict, reason) from a per-layer gradient-norm profile (input side first)."""
    return judge_profile(
        (norms[0], norms[-1]), norms, finite, ratio="first/last", size="a layer's norm",
        nonfinite="the loss or a gradient is inf/NaN", all_zero="every gradient is 0",
        healthy=lambda r, bottom, top: f"norms in [{bottom:.1e}, {top:.1e}], first/last {r:.1e}")


def judge_profile(ends, sizes, finite, *, ratio, size, nonfinite, all_zero, healthy):
    """The verdict rule of both studies: nonfinite; else exploding or vanishing where the ratio
    of the profile's ends (first/last: the input side's gradient over the output side's) leaves
    RATIO_RANGE; else where a size leaves NORM_RANGE; else healthy. The strings name what the
    caller measured (``ratio``, ``size``; ``healthy(ratio, smallest, largest)``)."""
    if not finite:
        return "nonfinite", nonfinite
    first, last = ends
    r = first / last if last > 0 else (math.inf if first > 0 else math.nan)
    if r > RATIO_RANGE[1]:
        return "exploding", f"{ratio} = {r:.1e} > {RATIO_RANGE[1]:g}"
    if not r >= RATIO_RANGE[0]:
        return "vanishing", (f"{ratio} = {r:.1e} < {RATIO_RANGE[0]:g}" if r == r else all_zero)
    top, bottom = max(sizes), min(sizes)
    if top > NORM_RANGE[1]:
        return "exploding", f"{size} {top:.1e} > {NORM_RANGE[1]:g}"
    if bottom < NORM_RANGE[0]:
        return "vanishing", f"{size} {bottom:.1e} < {NORM_RANGE[0]:g}"
    return "healthy", healthy(r, bottom, top)


def _norm(a) -> float:
    return l2_norm(np.asarray(a, dtype=np.float64).reshape(-1))


def _saturation(outputs, activation) -> Optional[float]:
    if activation not in ("sigmoid", "tanh"):
        return None
    fractions = []
    for _, kind, out in outputs:
        if kind == activation:
            h = np.asarray(out, dtype=np.float64)
            if activation == "sigmoid":
                fractions.append(float(np.mean((h < 1e-3) | (h > 1 - 1e-3))))
            else:
                fractions.append(float(np.mean(np.abs(h) > 0.995)))
    return float(np.mean(fractions)) if fractions else None


def measure(config: Config, precisions=PRECISIONS, check: bool = True) -> List[Result]:
    """One model, one Result per precision (the float64 run and the spot check are shared)."""
    model = Model(config.spec())
    params, x, y = model.prepare()
    weights = [n for n in model.param_shapes() if n.endswith("weight") and _is_dense(model, n)]
    state = model.default_state()
    state.outputs = []
    with np.errstate(all="ignore"):
        g = model.loss_and_grads(FLOAT64, params, x, y, state)
    outputs = state.outputs
    hidden = [out for name, kind, out in outputs if kind == config.activation]
    with np.errstate(all="ignore"):
        forward_var = [float(np.var(np.asarray(h, dtype=np.float64))) for h in hidden]
    relu_dead = dead_fractions(outputs)
    dead = float(np.mean(list(relu_dead.values()))) if relu_dead else None
    saturated = _saturation(outputs, config.activation)
    spot = None
    if check:
        with np.errstate(all="ignore"):
            spot = spot_check(model, params, x[:SPOT_CHECK_SAMPLES], y[:SPOT_CHECK_SAMPLES],
                              dps=SPOT_CHECK_DPS)
    results = []
    for precision in precisions:
        fp16 = {"fp16_overflow": None, "fp16_underflow": None, "fp16_layers": []}
        if precision == "float64":
            norms = [_norm(g.params[n]) for n in weights]
            loss = float(g.loss)
            finite = math.isfinite(loss) and all(np.all(np.isfinite(v)) for v in g.params.values())
        else:
            with np.errstate(all="ignore"):
                d = diagnose(model, Precision(precision, "autocast"), params, x, y)
            norms = [t.norm for t in d.tensors if t.kind == "param_grad" and t.name in weights]
            loss = d.loss
            finite = d.first_nonfinite is None
            counted = [t for t in d.tensors if t.kind in ("activation", "param_grad")]
            total = sum(t.numel for t in counted)
            fp16 = {"fp16_overflow": 100.0 * sum(t.overflow + t.nan for t in counted) / total,
                    "fp16_underflow": 100.0 * sum(t.underflow for t in counted) / total,
                    "fp16_layers": [{"name": t.name, "kind": t.kind,
                                     "overflow": (t.overflow + t.nan) / t.numel,
                                     "underflow": t.underflow / t.numel} for t in counted]}
        verdict, reason = judge(norms, finite)
        ratio = norms[0] / norms[-1] if norms[-1] not in (0.0,) and all(
            math.isfinite(v) for v in (norms[0], norms[-1])) else None
        results.append(Result(
            config.activation, config.init, config.depth, config.arch, precision, verdict, reason,
            ratio, [v if math.isfinite(v) else None for v in norms], forward_var, dead, saturated,
            loss=loss if math.isfinite(loss) else None,
            spot_checked=None if spot is None else spot.passed,
            spot_check_use=None if spot is None or not math.isfinite(spot.worst_use)
            else spot.worst_use, **fp16))
    return results


def _is_dense(model, name):
    layer = model.layers[int(name.split(".")[0])]
    if layer.type == "dense":
        return True
    return layer.type == "residual"      # "3.body.0.weight": the block's dense


def grid(quick: bool) -> List[Config]:
    g = QUICK if quick else FULL
    return [Config(a, i, d, arch) for a, i, arch, d in
            product(g["activations"], g["inits"], g["archs"], g["depths"])]


def run_study(quick: bool = True, out: Optional[Path] = None, check: bool = True,
              progress=None, configs: Optional[List[Config]] = None,
              precisions=PRECISIONS, executor=None) -> List[Result]:
    """Measure every configuration; write results.json, results.csv and (with matplotlib) the
    figures to ``out``. Diverging configurations become verdicts, never exceptions.

    ``progress``: a ``refnet.progress.Reporter`` told of every configuration (True: one on
    stderr; default silent). Ctrl-C raises ``refnet.progress.Interrupted`` whose ``partial`` is
    the rows of the configurations finished; with ``out``, they are first written to
    results.partial.json and results.partial.csv (the same columns; no figures), so that a
    partial grid is never mistaken for the whole one.

    ``executor``: any ``concurrent.futures.Executor`` (a ``dask.distributed`` client's, for a
    cluster) measures the configurations, one task each; the rows are gathered in the grid's
    order, so the results are those of a run in this process. Ctrl-C cancels what is pending."""
    configs = grid(quick) if configs is None else configs
    if progress is True:
        progress = Reporter(name="refnet study")
    results, _ = run_grid(configs, measure, precisions, check, progress or SILENT, executor, out,
                          lambda rows, _, path, partial: write_outputs(rows, path, partial))
    return results


def run_grid(configs, measure, precisions, check, progress, executor, out, write, extra=None):
    """The measuring loop of both studies: ``measure(config, precisions, check)`` for every
    configuration, in this process or one task each on ``executor`` (gathered in the grid's
    order), then ``extra`` — (label, fn), one more progress step, e.g. the clipping
    experiment — and ``write(rows, extra's result, Path(out), partial=False)`` when ``out``
    is given. Ctrl-C cancels what is pending, writes the finished rows (``partial=True``, no
    extra) and raises ``Interrupted`` with them. Returns (rows, extra's result or None)."""
    total = len(configs) + (1 if extra else 0)
    progress.start(total, "configurations", lines=LOG_LINES)
    results, futures, extra_result = [], [], None
    try:
        if executor is not None:
            futures = [executor.submit(measure, config, precisions, check) for config in configs]
        for k, config in enumerate(configs):
            results += futures[k].result() if futures else measure(config, precisions, check)
            progress.update(k + 1, config.spec()["name"])
        if extra is not None:
            label, fn = extra
            extra_result = fn()
            progress.update(total, label)
    except KeyboardInterrupt as stop:
        for future in futures:
            future.cancel()
        progress.close()
        done = len(results) // len(precisions)
        message = f"interrupted after {done} of {len(configs)} configurations"
        if out is not None and results:
            written = write(results, None, Path(out), True)
            message += (f"; the {len(results)} finished rows are in "
                        f"{' and '.join(str(p) for p in written)}")
        raise Interrupted(message, results, done, len(configs)
                          ).with_traceback(stop.__traceback__) from None
    finally:
        progress.close()
    if out is not None:
        try:
            write(results, extra_result, Path(out), False)
        except KeyboardInterrupt as stop:
            raise Interrupted(f"interrupted while writing the outputs to {out} (all "
                              f"{len(configs)} configurations were measured)", results,
                              len(configs), len(configs)
                              ).with_traceback(stop.__traceback__) from None
    return results, extra_result


# --- output --------------------------------------------------------------------------------
SPARK = "▁▂▃▄▅▆▇█"


def sparkline(norms: List[Optional[float]]) -> str:
    """log10 of each layer's gradient norm on 8 levels (min..max of the profile); '_' for 0,
    '!' for inf/NaN."""
    logs = [math.log10(v) for v in norms if v is not None and v > 0]
    lo, hi = (min(logs), max(logs)) if logs else (0.0, 0.0)
    out = []
    for v in norms:
        if v is None:
            out.append("!")
        elif v == 0:
            out.append("_")
        else:
            level = 0 if hi == lo else int(round((math.log10(v) - lo) / (hi - lo) * 7))
            out.append(SPARK[level])
    return "".join(out)


def _fmt(v, spec=".0e"):
    """``v`` formatted, or '-' padded to the spec's width."""
    if v is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width) if width else 1)
    return format(v, spec)


def format_table(results: List[Result], max_spark: int = 24) -> str:
    header = (f"{'activation':<10} {'init':<11} {'arch':<9} {'depth':>5} {'prec':<7} "
              f"{'verdict':<9} {'first/last':>10} {'grad norms (input → output)':<{max_spark}} "
              f"{'dead':>5} {'sat':>5} {'f16 ovf%':>8} {'f16 unf%':>8} ref")
    lines = [header, "-" * len(header)]
    for r in results:
        spark = sparkline(r.grad_norms)
        if len(spark) > max_spark:                       # deep nets: every k-th layer
            step = math.ceil(len(spark) / max_spark)
            spark = spark[::step]
        check = {True: "✓", False: "✗", None: "k"}[r.spot_checked] if r.spot_check_use is not None \
            or r.spot_checked is not None else "·"
        lines.append(
            f"{r.activation:<10} {r.init:<11} {r.arch:<9} {r.depth:>5} {r.precision:<7} "
            f"{r.verdict:<9} {_fmt(r.ratio, '10.1e')} {spark:<{max_spark}} "
            f"{_fmt(r.dead, '5.2f')} {_fmt(r.saturated, '5.2f')} "
            f"{_fmt(r.fp16_overflow, '8.2f')} {_fmt(r.fp16_underflow, '8.2f')} {check}")
    return "\n".join(lines)


def summary(results: List[Result]) -> str:
    """The textbook picture, checked, and what batchnorm and residual rescue (float64)."""
    by = {(r.activation, r.init, r.arch, r.depth, r.precision): r for r in results}
    deepest = max(r.depth for r in results)
    lines = [f"Verdicts at depth {deepest} (float64 unless noted):"]
    for act, init in (("sigmoid", "normal-0.01"), ("relu", "normal-1"), ("relu", "kaiming"),
                      ("tanh", "xavier"), ("selu", "lecun")):
        r = by.get((act, init, "plain", deepest, "float64"))
        if r:
            lines.append(f"  {act} + {init}: {r.verdict} ({r.reason})")
    rescued, not_rescued = [], []
    for r in results:
        if r.arch != "plain" or r.precision != "float64" or r.verdict == "healthy":
            continue
        for arch in ("batchnorm", "residual"):
            other = by.get((r.activation, r.init, arch, r.depth, "float64"))
            if other is None:
                continue
            label = f"{r.activation}+{r.init} depth {r.depth} ({r.verdict})"
            (rescued if other.verdict == "healthy" else not_rescued).append(
                f"{label} by {arch}" + ("" if other.verdict == "healthy" else
                                        f": still {other.verdict}, {other.reason}"))
    lines.append(f"Failing plain configurations rescued: {len(rescued)}; not rescued: "
                 f"{len(not_rescued)}")
    lines += [f"  rescued: {s}" for s in rescued[:12]]
    if len(rescued) > 12:
        lines.append(f"  ... and {len(rescued) - 12} more (results.json)")
    lines += [f"  not rescued: {s}" for s in not_rescued[:12]]
    if len(not_rescued) > 12:
        lines.append(f"  ... and {len(not_rescued) - 12} more (results.json)")
    checked = [r for r in results if r.precision == "float64" and r.spot_checked is not None]
    failed = [r for r in checked if not r.spot_checked]
    lines.append(f"Spot checks against the {SPOT_CHECK_DPS}-digit reference: {len(checked)} "
                 f"models, {len(failed)} failed")
    return "\n".join(lines)


def write_outputs(results: List[Result], out: Path, partial: bool = False) -> List[Path]:
    """results.json, results.csv and the figures; ``partial``: the rows of an interrupted run,
    as results.partial.json and results.partial.csv, no figures. A complete run removes the
    partial files an earlier interrupted one left."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "results.partial" if partial else "results"
    rows = [asdict(r) for r in results]
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    columns = ["activation", "init", "depth", "arch", "precision", "verdict", "reason", "ratio",
               "loss", "dead", "saturated", "fp16_overflow", "fp16_underflow", "spot_checked",
               "grad_norms"]
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([" ".join(_fmt(v, ".3e") for v in row[c]) if c == "grad_norms"
                             else row[c] for c in columns])
    written = [out / f"{stem}.json", out / f"{stem}.csv"]
    if partial:
        return written
    for stale in ("results.partial.json", "results.partial.csv"):
        (out / stale).unlink(missing_ok=True)
    try:
        from .plots import study_figures
    except ImportError:           # matplotlib is the optional "plot" extra
        return written
    return written + study_figures(results, out)
