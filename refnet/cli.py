"""Command line: ``refnet study``, ``refnet verify``, ``refnet grads``, ``refnet train``,
``refnet diagnose``, ``refnet capture``, ``refnet presets``, ``refnet vectors``,
``refnet conformance``, ``refnet import`` (also ``python -m refnet``).

Exit status: 0 all checks pass, 1 a check fails (verify, vectors check, conformance), training
stopped on a non-finite loss (train) or inf/NaN appeared (diagnose), 2 bad input (the message
names what is wrong), 130 interrupted (Ctrl-C: verify, train and study first write what they
finished, marked partial).

Progress goes to stderr, and only once a run has lasted REFNET_PROGRESS_AFTER seconds (default
2; refnet.progress); stdout is the report alone.

Bad input is one line on stderr, ``refnet CMD: error: ...``, naming the option or file, what was
expected and what was found; no traceback. Every option is checked before any work starts —
ranges (``MAX_DPS``, ``MAX_PREC``, ...), options that would be ignored in the combination given
(``--policy`` with a float precision, ``--prec`` without ``--certify``), and every output path
(``refnet.io.check_output_file`` / ``check_output_dir``): a bad one is reported before the
minutes of work it would otherwise follow, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from . import __version__
from .io import (
    check_input_dir,
    check_output_dir,
    check_output_file,
    load_data,
    load_params,
    save_gradients,
)
from .losses import Targets
from .model import Model
from .numerics.backend import get_backend
from .numerics.errorbound import LAMBDA
from .progress import Interrupted, Reporter, after_from_env
from .verification.triangle import EXACT_ENGINES, FD_TARGET_DIGITS, verify

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130          # 128 + SIGINT, what a shell reports for a Ctrl-C'd program


def _progress(args) -> Reporter:
    """Progress on stderr for this command, shown past REFNET_PROGRESS_AFTER seconds."""
    return Reporter(sys.stderr, name=f"refnet {args.command}", after=after_from_env(os.environ))


def _interrupted(args, stop, kept: str) -> int:
    """The one line a Ctrl-C leaves: where the work stopped and what was kept."""
    print(f"refnet {args.command}: {stop}; {kept}", file=sys.stderr)
    return EXIT_INTERRUPTED

# Limits of the options, and why (each is named in its error message):
MIN_DPS = 16              # MPBackend's floor: below float64's own ~16 digits it is no reference
MAX_DPS = 1000            # digits of the mp reference. The float64 gradients it is compared with
#                           need ~16 plus the digits lost to cancellation; 1000 covers losing 980,
#                           and the cost grows with the precision (the 20-layer sigmoid example:
#                           0.5 s at 50 digits, 12 s at 1000, 34 s at 10000 on one core).
MIN_PREC = 53             # IntervalBackend's floor: float64's 53 bits
MAX_PREC = 3322           # bits: 1000 digits (MAX_DPS · log2(10)), the same ceiling in bits
MAX_DIGITS = FD_TARGET_DIGITS   # the high-precision FD are set up to be good to 30 digits
#                           (truncation ~h² with h = 1e-15): more cannot be demanded of them.
# A static loss scale is held in float32, as torch's GradScaler holds it, and the gradients are
# multiplied by its float32 inverse: outside [2^-126, 2^126] one of the two would be inf, 0 or
# subnormal (1e300 became inf, with a numpy overflow warning).
LOSS_SCALE_RANGE = (2.0 ** -126, 2.0 ** 126)
FLOAT_PRECISIONS = ("float32", "float64")   # plain backends: no policy, no accumulation choice
EMULATED_GRADS = ("fp16", "bf16")            # grads --precision under the emulation


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (the usage is one ``--help`` away)."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_option(args, dest, low, high=None, why=""):
    """args.<dest> (already an int, or None: not given) lies in [low, high]."""
    value = getattr(args, dest)
    if value is None:
        return
    option = "--" + dest.replace("_", "-")
    if value < low or (high is not None and value > high):
        expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{option} must be {expected}{why}, got {value}")


def _real_option(args, dest, *, low=None, high=None, low_open=False, high_open=False, why=""):
    """args.<dest> (a float, or None: not given) is finite and lies in the interval given;
    argparse's float() accepts 'nan' and 'inf', so this is where they are refused."""
    value = getattr(args, dest)
    if value is None:
        return
    option = "--" + dest.replace("_", "-")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        if low is not None and high is not None:
            expected = (f"a number in {'(' if low_open else '['}{low:g}, {high:g}"
                        f"{')' if high_open else ']'}")
        elif low is not None:
            expected = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            expected = "a finite number"
        raise ValueError(f"{option} must be {expected}{why}, got {value!r}")


def _only_with(args, dests, condition, needs):
    """Options that mean nothing unless ``condition``: given without it they are an error
    (they would be silently ignored)."""
    if condition:
        return
    for dest in dests:
        if getattr(args, dest) is not None:
            raise ValueError(f"--{dest.replace('_', '-')} {needs}")


def _check_dps(args):
    _int_option(args, "dps", MIN_DPS, MAX_DPS,
                f" (mp digits: fewer than {MIN_DPS} are no reference for float64; more than "
                f"{MAX_DPS} only cost time, a float64 gradient's error is resolved with far fewer)")


def _load_params(model, path):
    """Parameters from ``path``, checked against the model now, so that a message names the
    file (the work that follows checks them again)."""
    if path is None:
        return None
    return model.check_params(load_params(path), source=f"params {path}")


def _load_data(model, path):
    """x and y of a data file; y a ``Targets`` (y with its upstream) where the file has an
    ``upstream`` (a loss with reduction "none"), checked against the loss here."""
    if path is None:
        return None, None
    x, y, upstream = load_data(path, upstream=True)
    if upstream is not None:
        y = Targets(y, upstream)
    try:
        model.loss.check_target(y, model.check_input(x).shape[0])
    except (ValueError, TypeError) as e:
        raise ValueError(f"data {path}: {e}") from None
    return x, y


def _inputs(args):
    model = Model.load(args.spec)
    params = _load_params(model, args.params)
    x, y = _load_data(model, args.data)
    return model, params, x, y


def _train(args):
    """--eval forces eval mode; otherwise the spec's mode (train by default, as torch)."""
    return False if args.eval else None


def _fmt(value, spec=".1e"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def format_report(report, model: Model, timings: bool = False) -> str:
    """The text report; ``timings``: with a line of the seconds of each leg (off by default, so
    that the same command prints the same report, byte for byte)."""
    lines = []
    n_checks = sum(t.fd_checks for t in report.tensors)
    lines.append(f"loss {report.loss!r} ({model.loss.type}, {model.loss.summary()}); "
                 f"{len(report.tensors)} gradient tensors; {'train' if report.train else 'eval'} mode")
    lines.append(f"1. float64 vs mp ({report.dps} digits): error in ulps of the exact value, held to "
                 f"min(rigorous running bound, {LAMBDA:g}σ)")
    lines.append(f"2. mp analytic vs mp central FD ({report.fd_mode} mode, {n_checks} checks): "
                 f"digits of agreement, >= {report.required_digits:g} required; dps = precision used")
    lines.append("3. float64 central FD: relative error, and the noise level it cannot beat "
                 "(informational)")
    lines.append("")
    header = (f"{'tensor':<12} {'shape':<10} {'max|g|':>8} {'ulp err':>9} {'<= bound':>9} "
              f"{'FD digits':>9} {'dps':>4} {'f64 FD err':>10} {'(noise)':>8}  result")
    lines.append(header)
    lines.append("-" * len(header))
    for t in report.tensors:
        shape = "x".join(map(str, t.shape)) or "scalar"
        if t.ulp_passed is None:
            ulp, bound = "kink", "-"
        else:
            ulp, bound = _fmt(t.max_ulp, ".3g"), _fmt(t.ulp_bound, ".2g")
        digits = _fmt(t.fd_digits, ".1f") if math.isfinite(t.fd_digits) else ("-" if t.fd_kinks else ">dps")
        result = "ok" if t.passed else "FAIL"
        if t.fd_kinks:
            result += f" ({t.fd_kinks} kink{'s' if t.fd_kinks > 1 else ''})"
        lines.append(f"{t.name:<12} {shape:<10} {_fmt(t.grad_max_abs, '.1e'):>8} {ulp:>9} "
                     f"{bound:>9} {digits:>9} {t.fd_dps:>4} {_fmt(t.fd64_rel_err):>10} "
                     f"{'(' + _fmt(t.fd64_noise, '.0e') + ')':>8}  {result}")
    for k in report.kinks:
        lines.append(f"kink: {k}")
    for t in report.tensors:
        for k in t.kinks:
            lines.append(f"kink in {t.name}: {k}")
    if report.engine:
        lines.append(f"exact engine: {report.engine}")
    if timings and report.timings:
        lines.append(_format_timings(report.timings))
    lines.append("")
    if report.incomplete:           # Ctrl-C: the tensors done, never a PASSED
        failed = [t.name for t in report.tensors if not t.passed]
        if failed:
            lines.append(f"FAILED: {', '.join(failed)}")
        lines.append(f"INCOMPLETE: {report.incomplete}")
    elif report.passed:
        lines.append("PASSED: every gradient matches the exact one within its float64 error "
                     "bound, and the exact one matches high-precision finite differences.")
    else:
        failed = [t.name for t in report.tensors if not t.passed]
        lines.append(f"FAILED: {', '.join(failed)}")
    return "\n".join(lines)


TIMING_LABELS = (("float64_and_bound", "float64 + bound"), ("exact", "exact"),
                 ("fd_exact", "FD exact (summed over workers)"), ("fd_float64", "FD float64"))


def _format_timings(timings) -> str:
    legs = ", ".join(f"{label} {timings[key]:.3g} s" for key, label in TIMING_LABELS
                     if key in timings)
    return f"time: {legs}; total {timings.get('total', math.nan):.3g} s"


VERIFY_DEFAULTS = {"engine": "auto", "timings": False, "dps": 50, "digits": 20.0, "mode": "auto",
                   "directions": 2, "seed": 0, "prec": 150}


def _check_verify(args):
    """verify's options, before any work: ranges, and none that the mode given would ignore
    (--certify computes its own reference precision from --prec and runs no finite
    differences; --mode element differentiates along unit vectors, drawing no directions)."""
    fd_options = ("dps", "digits", "mode", "directions", "seed", "engine", "jobs", "timings")
    _only_with(args, fd_options, not args.certify,
               "has no effect with --certify (it runs interval arithmetic at --prec bits, with "
               "a reference precision of its own and no finite differences)")
    _only_with(args, ("prec",), args.certify, "applies to --certify only")
    _only_with(args, ("directions", "seed"), args.mode != "element",
               "has no effect with --mode element (every element gets its own unit vector; no "
               "random directions are drawn)")
    _check_dps(args)
    _int_option(args, "prec", MIN_PREC, MAX_PREC,
                f" bits ({MIN_PREC}: float64's own; {MAX_PREC} bits = {MAX_DPS} digits, the "
                f"--dps limit)")
    _int_option(args, "directions", 1, why=" (random directions per tensor)")
    _int_option(args, "jobs", 1, why=" (worker processes for the finite differences)")
    _int_option(args, "seed", 0, why=" (a numpy seed)")
    _real_option(args, "digits", low=0, high=MAX_DIGITS, low_open=True,
                 why=f" (the high-precision finite differences are set up to be good to "
                     f"{MAX_DIGITS} digits, refnet.verification.FD_TARGET_DIGITS)")
    for key, value in VERIFY_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.certify and args.digits >= args.dps:
        raise ValueError(f"--digits {args.digits:g} must be below --dps {args.dps} (the exact "
                         f"analytic gradient is only good to --dps digits)")


def cmd_verify(args) -> int:
    _check_verify(args)
    model, params, x, y = _inputs(args)
    if args.certify:
        from dataclasses import asdict

        from .verification.certify import certify, format_certificate
        c = certify(model, params, x, y, prec=args.prec, train=_train(args))
        if args.json:
            print(json.dumps({**asdict(c), "status": c.status}, indent=1))
        else:
            print(format_certificate(c))
        return EXIT_FAIL if c.failed else EXIT_OK
    stop = None
    try:
        report = verify(model, params, x, y, dps=args.dps, digits=args.digits, mode=args.mode,
                        directions=args.directions, seed=args.seed, train=_train(args),
                        progress=_progress(args), engine=args.engine, jobs=args.jobs)
    except Interrupted as interrupted:
        if interrupted.partial is None:
            return _interrupted(args, interrupted, "nothing to report")
        stop, report = interrupted, interrupted.partial
    if args.json:
        print(json.dumps(report.to_dict(timings=args.timings), indent=1))
    else:
        print(format_report(report, model, timings=args.timings))
    if stop:
        return _interrupted(args, stop, "the report of those is on stdout, marked INCOMPLETE")
    return EXIT_OK if report.passed else EXIT_FAIL


def _check_grads(args):
    """grads' options, before any work."""
    _only_with(args, ("dps",), args.precision == "mp", "applies to --precision mp only")
    _check_dps(args)
    args.dps = 50 if args.dps is None else args.dps
    emulated = args.precision in EMULATED_GRADS
    _only_with(args, ("policy", "accumulate", "loss_scale", "loss_dtype"), emulated,
               f"applies to --precision fp16 or bf16 only (--precision {args.precision} runs "
               f"the plain {args.precision} backend, which has no mixed-precision policy)")
    if args.loss_scale == "dynamic":
        raise ValueError("--loss-scale: grads writes one pass and takes a static scale S; "
                         "'dynamic' (GradScaler's opening passes) applies to diagnose and train")
    args.policy = "autocast" if args.policy is None else args.policy
    args.accumulate = "float32" if args.accumulate is None else args.accumulate
    args.loss_dtype = "policy" if args.loss_dtype is None else args.loss_dtype
    args.loss_scale = 1.0 if args.loss_scale is None else args.loss_scale
    check_output_file(args.out, "--out")


def _emulated_grads(args, model, params, x, y) -> int:
    """grads under the fp16/bf16 emulation: the gradients unscaled (× GradScaler's float32
    inverse scale, in float32: the stored value divided by S exactly when S is a power of two),
    under torch names, as float32 — which holds every fp16 and bf16 value exactly — with the
    format each was stored in (``dtype/<name>``) and the run's settings beside them."""
    from .lowp.emulation import Precision, dtype_name, run
    precision = Precision(args.precision, args.policy, args.accumulate,
                          loss_dtype=args.loss_dtype)
    state = model.default_state(_train(args))
    r = run(model, precision, params, x, y, state, loss_scale=args.loss_scale)
    grads = {model.torch_name(k): v for k, v in r.grads.items()}
    extra = {"loss_scale": np.float64(r.loss_scale), "precision": np.str_(precision.storage),
             "policy": np.str_(precision.policy), "accumulate": np.str_(precision.accumulate),
             "loss_dtype": np.str_(precision.loss_dtype)}
    extra.update({f"dtype/{model.torch_name(k)}": np.str_(dtype_name(g))
                  for k, g in r.scaled_grads.items()})
    stored_x = r.x_grad_stored if r.x_grad_stored is not None else r.x_grad
    extra["dtype/x"] = np.str_(dtype_name(stored_x))
    save_gradients(args.out, np.float32(r.loss), {k: np.asarray(v, dtype=np.float32)
                                                   for k, v in grads.items()},
                   np.asarray(r.x_grad, dtype=np.float32), extra=extra)
    nonfinite = r.first_nonfinite()
    print(f"loss {r.loss!r}; wrote loss, grad/x and {len(grads)} parameter gradients "
          f"({precision}, loss scale {r.loss_scale:g}, unscaled) to {args.out}"
          + (f"; first inf/NaN: {nonfinite}" if nonfinite else ""))
    return EXIT_OK


def cmd_grads(args) -> int:
    _check_grads(args)
    model, params, x, y = _inputs(args)
    params, x, y = model.prepare(params, x, y)
    if args.precision in EMULATED_GRADS:
        return _emulated_grads(args, model, params, x, y)
    bk = get_backend(args.precision, args.dps)
    grads = model.loss_and_grads(bk, params, x, y, model.default_state(_train(args)))
    # mp results are written correctly rounded to float64 (npz holds no mpf without pickle).
    out_dtype = np.float32 if args.precision == "float32" else np.float64
    as_out = lambda a: bk.to_numpy(a).astype(out_dtype)
    losses = (as_out(model.loss.unreduced(bk, grads.forward.output, y))
              if model.loss.reduction == "none" else None)       # the loss vector, torch's
    save_gradients(args.out, as_out(grads.loss), {k: as_out(v) for k, v in grads.params.items()},
                   as_out(grads.x), losses)
    print(f"loss {float(bk.to_numpy(grads.loss))!r}; wrote loss, "
          f"{'losses (the loss vector; loss = Σ upstream·losses), ' if losses is not None else ''}"
          f"grad/x and "
          f"{len(grads.params)} parameter gradients ({args.precision}) to {args.out}")
    return EXIT_OK


def cmd_train(args) -> int:
    import copy

    from .io import save_params
    from .training.loop import train
    from .training.optim import make_optimizer
    _check_train(args)
    model = Model.load(args.spec)
    if args.l1 is not None or args.l2 is not None:
        spec = copy.deepcopy(model.spec)
        reg = dict(spec.get("regularization", {}))
        reg.update({k: v for k, v in (("l1", args.l1), ("l2", args.l2)) if v is not None})
        spec["regularization"] = reg
        model = Model(spec)
    params = _load_params(model, args.params)
    x, y = _load_data(model, args.data)
    options = {"momentum": args.momentum} if args.optimizer == "sgd" else {}
    optimizer = make_optimizer(args.optimizer, args.lr, **options)
    precision = scaler = None
    if args.precision != "float64":
        from .lowp.emulation import Precision
        from .lowp.gradscaler import GradScaler
        precision = Precision(args.precision, args.policy, loss_dtype=args.loss_dtype)
        if args.loss_scale == "dynamic":
            scaler = GradScaler()
        elif args.loss_scale is not None:
            scaler = GradScaler(init_scale=args.loss_scale, dynamic=False)
    stop = None
    try:
        result = train(model, params, x, y, optimizer, args.steps, clip_norm=args.clip_norm,
                       clip_value=args.clip_value, precision=precision, scaler=scaler,
                       progress=_progress(args))
    except Interrupted as interrupted:
        # Keep the steps done: their history below, and (if asked) the parameters after the
        # last of them; with no step done there is nothing to save.
        stop, result = interrupted, interrupted.partial
    if args.save_params and not (stop and result.steps_done == 0):
        save_params(args.save_params, result.params)
    if args.json:
        print(json.dumps({"stopped": result.stopped, "steps_done": result.steps_done,
                          "history": result.history}, indent=1, default=float))
    else:
        names = list(model.param_shapes())
        print(f"{'step':>5} {'loss':>12} {'|grad|':>9} {'first/last layer |grad|':>24} "
              f"{'dead relu':>9}")
        every = max(1, len(result.history) // 20)
        shown = result.history[::every]
        if shown and shown[-1] is not result.history[-1]:      # the last step, once
            shown.append(result.history[-1])
        for h in shown:
            first, last = h["grad_norm"][names[0]], h["grad_norm"][names[-1]]
            ratio = first / last if last else math.inf
            dead = np.mean(list(h["dead_fraction"].values())) if h["dead_fraction"] else 0.0
            print(f"{h['step']:>5} {h['loss']:>12.6g} {h['total_grad_norm']:>9.3g} "
                  f"{ratio:>24.3g} {dead:>9.3f}")
        print(result.stopped or f"trained {result.steps_done} steps")
    if stop:
        kept = "the history so far is on stdout"
        if args.save_params:
            kept += (f", the parameters after those {result.steps_done} steps in "
                     f"{args.save_params}" if result.steps_done
                     else f"; no step finished, {args.save_params} not written")
        return _interrupted(args, stop, kept)
    return EXIT_FAIL if result.stopped else EXIT_OK


def _check_train(args):
    """train's options, before any work."""
    _int_option(args, "steps", 1)
    _real_option(args, "lr", low=0, low_open=True, why=" (the learning rate)")
    _only_with(args, ("momentum",), args.optimizer == "sgd",
               f"applies to --optimizer sgd only (got --optimizer {args.optimizer})")
    # torch accepts any momentum >= 0; at 1 and above the velocity never decays (it grows
    # geometrically above 1), which is no setting anyone means: refused.
    _real_option(args, "momentum", low=0, high=1, high_open=True, why=" (SGD momentum)")
    _real_option(args, "clip_norm", low=0, low_open=True,
                 why=" (clip_grad_norm's max_norm)")
    _real_option(args, "clip_value", low=0, low_open=True, why=" (clip_grad_value's bound)")
    _real_option(args, "l1", low=0, why=" (a penalty weight)")
    _real_option(args, "l2", low=0, why=" (a penalty weight)")
    emulated = args.precision not in FLOAT_PRECISIONS
    _only_with(args, ("policy",), emulated,
               f"applies to --precision fp16 or bf16 only (--precision {args.precision} runs "
               f"the plain {args.precision} backend, which has no mixed-precision policy)")
    _only_with(args, ("loss_scale",), emulated,
               f"needs --precision fp16 or bf16 ({args.precision} gradients do not underflow "
               f"to need one)")
    _only_with(args, ("loss_dtype",), emulated,
               f"applies to --precision fp16 or bf16 only (--precision {args.precision} "
               f"computes the loss in {args.precision})")
    args.policy = "autocast" if args.policy is None else args.policy
    args.loss_dtype = "policy" if args.loss_dtype is None else args.loss_dtype
    args.momentum = 0.0 if args.momentum is None else args.momentum
    if args.save_params:
        check_output_file(args.save_params, "--save-params")


def _loss_scale(text):
    if text == "dynamic":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'dynamic', got {text!r}")
    low, high = LOSS_SCALE_RANGE
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(
            f"must lie in [2^-126, 2^126] (the scale and its inverse are held in float32, as "
            f"torch's GradScaler holds them; outside, one would be inf, 0 or subnormal), "
            f"got {text!r}")
    return value


def _check_diagnose(args):
    """diagnose's options, before any work."""
    if (args.spec is None) == (args.preset is None):
        raise ValueError("give either a spec file or --preset NAME (refnet presets lists them)")
    _real_option(args, "lr", low=0, low_open=True,
                 why=" (the learning rate of the weight-update rows)")
    _only_with(args, ("policy", "accumulate", "loss_dtype"),
               args.precision not in FLOAT_PRECISIONS,
               f"applies to the emulated formats only (--precision {args.precision} runs the "
               f"plain {args.precision} backend, which has no mixed-precision policy or "
               f"accumulation choice)")
    _only_with(args, ("compare",), args.precision not in FLOAT_PRECISIONS,
               f"compares emulated fp16/bf16 gradients with a GPU run's; --precision "
               f"{args.precision} runs the plain {args.precision} backend")
    if args.compare is not None and args.loss_scale == "dynamic":
        raise ValueError("--compare needs a static --loss-scale S (the scale the GPU run used); "
                         "'dynamic' chooses its own")
    args.policy = "autocast" if args.policy is None else args.policy
    args.accumulate = "float32" if args.accumulate is None else args.accumulate
    args.loss_dtype = "policy" if args.loss_dtype is None else args.loss_dtype
    if args.plot:
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            raise ValueError("--plot needs matplotlib (pip install 'refnet[plot]')") from None
        check_output_file(args.plot, "--plot")
        # matplotlib picks the format from the extension, and appends ".png" to a name without
        # one: the file written would not be the one named. A known extension is required.
        formats = FigureCanvasBase.get_supported_filetypes()
        suffix = Path(args.plot).suffix.lower().lstrip(".")
        if suffix not in formats:
            raise ValueError(f"--plot {args.plot}: expected a file name ending in a figure format "
                             f"({', '.join('.' + f for f in sorted(formats))}), got "
                             f"{'no extension' if not suffix else '.' + suffix}")


def cmd_diagnose(args) -> int:
    from .lowp.diagnose import diagnose, format_table
    from .lowp.emulation import Precision
    from .study.presets import preset
    _check_diagnose(args)
    if args.preset is not None:
        model = Model(preset(args.preset))
        params = _load_params(model, args.params)
        x, y = _load_data(model, args.data)
    else:
        model, params, x, y = _inputs(args)
    theirs = None
    if args.compare is not None:              # read and checked before the work
        from .io import load_gradients
        from .lowp.diagnose import check_compare
        params, x, y = model.prepare(params, x, y)
        theirs = check_compare(model, load_gradients(args.compare),
                               f"--compare {args.compare}", batch=x.shape[0])
    precision = Precision(args.precision, args.policy, args.accumulate,
                          loss_dtype=args.loss_dtype)
    d = diagnose(model, precision, params, x, y, loss_scale=args.loss_scale, lr=args.lr,
                 train=_train(args), progress=_progress(args), compare=theirs)
    if args.json:
        print(json.dumps(d.as_json(), indent=1))
    else:
        print(format_table(d))
        if d.comparison is not None:
            from .lowp.diagnose import format_comparison
            print()
            print(format_comparison(d.comparison, args.compare))
    if args.plot:
        try:
            from .study.plots import diagnose_figure
        except ImportError:
            raise ValueError("--plot needs matplotlib (pip install 'refnet[plot]')") from None
        diagnose_figure(d, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_FAIL if d.first_nonfinite else EXIT_OK


def cmd_vectors(args) -> int:
    from .interop.vectors import check, write
    (check_output_dir if args.action == "write" else check_input_dir)(args.dir, "DIR")
    if args.action == "write":
        written = write(args.dir)
        print(f"wrote {len(written)} vectors to {args.dir}/")
        return EXIT_OK
    problems = check(args.dir)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} drift(s): the implementation no longer reproduces the vectors")
        return EXIT_FAIL
    print(f"every vector in {args.dir}/ recomputed: no drift")
    return EXIT_OK


def cmd_conformance(args) -> int:
    from dataclasses import asdict

    from .interop.conformance import conformance, format_results
    check_input_dir(args.dir, "--dir")
    results = conformance(args.dir, args.framework, args.dtype, args.strict_kinks)
    if args.json:
        print(json.dumps({"framework": args.framework, "dtype": args.dtype,
                          "strict_kinks": args.strict_kinks,
                          "passed": all(v.passed for v in results),
                          "vectors": [asdict(v) for v in results]}, indent=1))
    else:
        print(format_results(results, args.dtype))
    return EXIT_OK if all(v.passed for v in results) else EXIT_FAIL


def cmd_capture(args) -> int:
    """``refnet capture``: the gradients of a torch run on a GPU of the same model, data, policy
    and loss scale the emulation is given, unscaled, by torch name, for ``diagnose --compare``
    (``refnet.interop.torch_capture``)."""
    from .io import save_params
    from .study.presets import preset
    if (args.spec is None) == (args.preset is None):
        raise ValueError("give either a spec file or --preset NAME (refnet presets lists them)")
    if args.loss_scale == "dynamic":
        raise ValueError("--loss-scale: capture runs one pass and takes a static scale S; "
                         "'dynamic' applies to diagnose and train")
    check_output_file(args.out, "--out")
    if args.preset is not None:
        model = Model(preset(args.preset))
        params, (x, y) = _load_params(model, args.params), _load_data(model, args.data)
    else:
        model, params, x, y = _inputs(args)
    params, x, y = model.prepare(params, x, y)
    train = model.default_state(_train(args)).train
    try:
        import torch
    except ImportError:
        raise ValueError("refnet capture needs torch (pip install torch==2.13.0 for the CPU, "
                         "a CUDA build of torch for the GPU run it is meant for)") from None
    from .interop.torch_capture import capture_gradients, check_capturable
    check_capturable(model, train)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device (torch.cuda.is_available() is "
                         f"False); --device cpu runs torch's CPU kernels, which are not CUDA's")
    grads = capture_gradients(model, params, x, y, args.precision, args.policy,
                              1.0 if args.loss_scale is None else args.loss_scale,
                              args.loss_dtype, args.device, train,
                              reduced_precision_reduction=not args.no_reduced_precision_reduction)
    save_params(args.out, grads)        # named arrays, written at exactly the path given
    print(f"captured {len(grads) - 1} parameter gradients and x on {args.device} "
          f"({args.precision}, {args.policy}, loss dtype {args.loss_dtype}, loss scale "
          f"{1.0 if args.loss_scale is None else args.loss_scale:g}), unscaled, to {args.out}")
    return EXIT_OK


def cmd_import(args) -> int:
    """``refnet import MODEL.pt2 --out SPEC.json --params P.npz --loss TYPE``: a program saved
    with ``torch.export.save`` as a refnet spec (each layer's torch_name its module path) and
    its parameters and buffers under torch's names (``refnet.interop.torch_import``)."""
    from .io import save_params
    for option, path in (("--out", args.out), ("--params", args.params)):
        check_output_file(path, option)
    if Path(args.out).resolve() == Path(args.params).resolve():
        raise ValueError(f"--out and --params name the same file {args.out}")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ValueError("refnet import needs torch (pip install torch==2.13.0)") from None
    from .interop.torch_import import (
        UnsupportedModel,
        check_program,
        from_program,
        load_program,
    )
    program = load_program(args.model)
    try:
        model, params = from_program(program, {"type": args.loss, "reduction": args.reduction},
                                     name=Path(args.model).stem)
        check_program(model, params, program, args.model)
    except UnsupportedModel as e:
        raise ValueError(f"MODEL {args.model}: {str(e).removeprefix('from_torch: ')}") from None
    Path(args.out).write_text(json.dumps(model.spec, indent=1) + "\n")
    save_params(args.params, params)
    print(f"imported {args.model}: {len(model.layers)} layers, {model.mode} mode, "
          f"{len(model.param_shapes())} parameters and {len(params) - len(model.param_shapes())}"
          f" buffers (torch names); wrote {args.out} and {args.params}")
    return EXIT_OK


def cmd_presets(args) -> int:
    from .study.presets import PRESETS
    for name, spec in PRESETS.items():
        print(f"{name:<14} {spec.get('description', '')}")
    return EXIT_OK


def cmd_study(args) -> int:
    from pathlib import Path

    from .study.grid import format_table, run_study, summary
    check_output_dir(args.out, "--out")
    out = Path(args.out)
    options = dict(quick=args.quick, out=out, check=not args.no_check, progress=_progress(args))
    if args.recurrent:
        from .study.recurrent import format_recurrent_table, recurrent_summary, run_recurrent_study
        return _report_study(args, out, lambda: run_recurrent_study(**options),
                             format_recurrent_table, recurrent_summary, "recurrent")
    return _report_study(args, out, lambda: (run_study(**options),), format_table, summary, "")


def _report_study(args, out, run, table, summarize, prefix) -> int:
    """Run a study (``run`` -> (results, *what its summary also takes)) and print its table,
    its summary and the files it wrote (those named ``prefix``…); on Ctrl-C, the table of the
    configurations finished."""
    try:
        results, *rest = run()
    except Interrupted as stop:
        if stop.partial:
            print(table(stop.partial))
        return _interrupted(args, stop, "their table is on stdout" if stop.partial
                            else "nothing to keep")
    print(table(results))
    print()
    print(summarize(results, *rest))
    written = sorted(p.name for p in out.iterdir() if p.name.startswith(prefix))
    print(f"\nwrote {', '.join(written)} to {out}/")
    return EXIT_OK


DESCRIPTION = ("Ground-truth backpropagation for MLPs and CNNs: every gradient proven right "
               "three ways (float64 against 50-digit mpmath within an error bound, "
               "high-precision analytic against high-precision finite differences, float64 "
               "finite differences).")
EPILOG = ("exit status: 0 all checks pass; 1 a check fails (verify, vectors check, conformance), "
          "training stopped on a non-finite loss (train) or inf/NaN appeared (diagnose); 2 bad "
          "input (one line on stderr naming it); 130 when interrupted (Ctrl-C), keeping what "
          "is done.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="refnet", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"refnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    # Options whose default is None are filled in by the command's check (_check_verify, ...):
    # None tells "not given" from "given", so that an option the other options make
    # meaningless is refused rather than ignored.
    def common(p, optional_spec=False, dps_help=None):
        p.add_argument("spec", nargs="?" if optional_spec else None,
                       help="model spec (JSON, see spec/model-format.md)")
        p.add_argument("--params", help=".npz of parameters by torch name (default: the spec's inits)")
        p.add_argument("--data", help=".npz with x and y, and upstream for a loss with "
                       "reduction 'none' (default: a seeded batch)")
        if dps_help:
            p.add_argument("--dps", type=int, default=None, help=dps_help)
        p.add_argument("--eval", action="store_true",
                       help="eval mode: running statistics in batchnorm, no dropout "
                            "(default: the spec's mode, train unless it says eval)")

    v = sub.add_parser("verify", help="prove every gradient three ways")
    common(v, dps_help=f"mp significant digits of the exact run, {MIN_DPS} to {MAX_DPS} "
                       f"(default 50)")
    v.add_argument("--json", action="store_true", help="the report as JSON")
    v.add_argument("--digits", type=float, default=None,
                   help=f"digits of agreement required between mp analytic and mp FD, above 0, "
                        f"at most {MAX_DIGITS} and below --dps (default 20)")
    v.add_argument("--mode", choices=["auto", "element", "direction"], default=None,
                   help="FD per element or along random directions (default: auto by size)")
    v.add_argument("--directions", type=int, default=None,
                   help="random directions per tensor, >= 1 (default 2)")
    v.add_argument("--seed", type=int, default=None,
                   help="seed of the random directions, >= 0 (default 0)")
    v.add_argument("--engine", choices=list(EXACT_ENGINES), default=None,
                   help="the exact engine of the dps-digit run and the high-precision finite "
                        "differences (default auto: the fastest that applies)")
    v.add_argument("--jobs", type=int, default=None,
                   help="worker processes for the finite differences, >= 1 (default: every "
                        "core, or 1 for a model too small to gain)")
    v.add_argument("--timings", action="store_const", const=True, default=None,
                   help="add the seconds of each leg to the report (text: one line; JSON: "
                        "\"timings\"); off by default, so that the same command prints the "
                        "same report")
    v.add_argument("--certify", action="store_true",
                   help="instead: enclose every gradient element in a proven interval "
                        "(interval arithmetic; exit 1 only if an enclosure excludes the "
                        "high-precision value, 0 when certified or not certifiable at a kink)")
    v.add_argument("--prec", type=int, default=None,
                   help=f"interval precision in bits for --certify, {MIN_PREC} to {MAX_PREC} "
                        f"(default 150)")
    v.set_defaults(func=cmd_verify)

    g = sub.add_parser("grads", help="write the loss and every gradient to an .npz")
    common(g, dps_help=f"digits of --precision mp, {MIN_DPS} to {MAX_DPS} (default 50)")
    g.add_argument("--precision", choices=["float64", "float32", "mp", "fp16", "bf16"],
                   default="float64",
                   help="fp16/bf16: the emulation (refnet.lowp.emulation); the gradients are "
                        "written unscaled, under torch names, as float32 (which holds every "
                        "fp16/bf16 value), with the format each was stored in")
    g.add_argument("--policy", choices=["autocast", "half"], default=None,
                   help="with fp16/bf16: autocast (default) or half (model.half())")
    g.add_argument("--accumulate", choices=["float32", "storage"], default=None,
                   help="with fp16/bf16: float32 accumulation (default) or storage")
    g.add_argument("--loss-scale", type=_loss_scale, default=None,
                   help="with fp16/bf16: a static loss scale S in [2^-126, 2^126] (default 1); "
                        "the gradients are written unscaled")
    g.add_argument("--loss-dtype", choices=["policy", "float32"], default=None,
                   help="with fp16/bf16: the policy's own loss (default) or float32: "
                        "loss_fn(output.float(), y)")
    g.add_argument("--out", required=True, help="output .npz")
    g.set_defaults(func=cmd_grads)

    t = sub.add_parser("train", help="full-batch training with per-step gradient health")
    t.add_argument("spec", help="model spec (JSON)")
    t.add_argument("--params", help=".npz of initial parameters")
    t.add_argument("--data", help=".npz with x and y (default: the spec's seeded batch)")
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--lr", type=float, required=True)
    t.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd")
    t.add_argument("--momentum", type=float, default=None,
                   help="SGD momentum, in [0, 1) (default 0; --optimizer sgd only)")
    t.add_argument("--clip-norm", type=float, help="clip the global gradient norm to this")
    t.add_argument("--clip-value", type=float, help="clip every gradient element to ±this")
    t.add_argument("--l1", type=float, help="L1 penalty α (α·Σ|w| over weights)")
    t.add_argument("--l2", type=float, help="L2 penalty α (α/2·Σw² over weights)")
    t.add_argument("--save-params", help="write the final parameters (torch names) here")
    t.add_argument("--precision", choices=["float64", "float32", "fp16", "bf16"],
                   default="float64", help="train under the fp16/bf16 emulation (refnet.lowp.emulation)")
    t.add_argument("--policy", choices=["autocast", "half"], default=None,
                   help="with fp16/bf16: autocast (default) or half")
    t.add_argument("--loss-scale", type=_loss_scale, default=None,
                   help="GradScaler: a static scale S in [2^-126, 2^126], or 'dynamic' "
                        "(2^16, torch's rules)")
    t.add_argument("--loss-dtype", choices=["policy", "float32"], default=None,
                   help="with fp16/bf16: the policy's own loss (default) or float32: "
                        "loss_fn(output.float(), y), GradScaler's pattern on a half model")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("diagnose", help="per-layer overflow/underflow in fp16/bf16 against a "
                                        "float64 shadow run")
    common(d, optional_spec=True)
    d.add_argument("--preset", help="a named model instead of a spec file (refnet presets)")
    d.add_argument("--plot", help="write a per-layer figure to this file, in the format its "
                                  "extension names (.png, .pdf, .svg, ...; needs matplotlib)")
    d.add_argument("--precision", choices=["fp16", "bf16", "fp8_e5m2", "fp8_e4m3fn", "float32",
                                           "float64"], default="fp16")
    d.add_argument("--policy", choices=["autocast", "half"], default=None,
                   help="autocast: float32 master weights, float32 loss (default); "
                        "half: everything in the storage format (model.half())")
    d.add_argument("--accumulate", choices=["float32", "storage"], default=None,
                   help="float32 accumulation as tensor cores (default), or every partial sum "
                        "rounded to the storage format")
    d.add_argument("--loss-scale", type=_loss_scale, default=1.0,
                   help="static loss scale S in [2^-126, 2^126], or 'dynamic' (GradScaler: "
                        "2^16, halved until clean)")
    d.add_argument("--loss-dtype", choices=["policy", "float32"], default=None,
                   help="the policy's own loss (default: autocast's float32 cross-entropy, "
                        "half's in the storage format) or float32: loss_fn(output.float(), y)")
    d.add_argument("--compare", metavar="THEIRS.npz", default=None,
                   help="compare the emulated gradients with a GPU run's (unscaled, by torch "
                        "name, optionally x): per tensor the fraction equal, the largest "
                        "difference in ulps of the format, where they first differ")
    d.add_argument("--lr", type=float, default=0.01,
                   help="SGD learning rate of the weight-update rows (default 0.01)")
    d.add_argument("--json", action="store_true",
                   help='JSON: "tensors" (name, kind, overflow, underflow, nan, subnormal, '
                        'max_abs, numel, ...) and "first_nonfinite"')
    d.set_defaults(func=cmd_diagnose)

    st = sub.add_parser("study", help="the gradient-health study: depth x activation x init x "
                                      "architecture x precision")
    st.add_argument("--quick", action="store_true",
                    help="a small grid (4 activations, 5 inits, 3 architectures, depths 3 and "
                         "12, float64 and fp16; with --recurrent: 4 cells, lengths 10 and 100, "
                         "spectral radii 0.5, 1, 1.5): under a minute")
    st.add_argument("--recurrent", action="store_true",
                    help="the recurrent study instead: rnn-tanh, rnn-relu, lstm, gru x sequence "
                         "length x spectral radius of W_hh x init, gradients through time, fp16 "
                         "underflow per step, clipping an exploding RNN (recurrent.json, ...)")
    st.add_argument("--out", default="study-results",
                    help="directory for results.json, results.csv and the figures "
                         "(default study-results)")
    st.add_argument("--no-check", action="store_true",
                    help="skip the spot checks against the high-precision reference")
    st.set_defaults(func=cmd_study)

    ve = sub.add_parser("vectors", help="write or check the golden gradient vectors")
    ve.add_argument("action", choices=["write", "check"])
    ve.add_argument("dir", help="directory of vector files (the committed set: spec/vectors)")
    ve.set_defaults(func=cmd_vectors)

    co = sub.add_parser("conformance", help="run the golden vectors in another framework and "
                                            "report its errors in ulps")
    co.add_argument("--framework", default="torch",
                    help="torch (default) or jax (spec/conformance.md: any other by hand)")
    co.add_argument("--strict-kinks", action="store_true",
                    help="hold the elements flagged kink to the vectors' values (torch's "
                         "conventions) too; by default they are reported apart, not failed")
    co.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    co.add_argument("--dir", default="spec/vectors", help="vector directory (spec/vectors)")
    co.add_argument("--json", action="store_true")
    co.set_defaults(func=cmd_conformance)

    im = sub.add_parser("import", help="a torch.export program (.pt2) as a refnet spec and "
                                       "parameters, under torch's names")
    im.add_argument("model", metavar="MODEL", help="a .pt2 file written by torch.export.save "
                    "(torch.save/pickle files are refused: refnet never unpickles)")
    im.add_argument("--out", required=True, help="the refnet model spec to write (JSON)")
    im.add_argument("--params", required=True, help="the .npz of parameters and buffers to "
                                                     "write, keyed by torch names")
    im.add_argument("--loss", required=True,
                    help="the loss the spec gets (a .pt2 holds none): mse, "
                         "softmax_cross_entropy, bce_with_logits")
    im.add_argument("--reduction", choices=["mean", "sum"], default="mean")
    im.set_defaults(func=cmd_import)

    ca = sub.add_parser("capture", help="a torch GPU run's gradients of the same model and "
                                         "policy, for diagnose --compare (needs torch)")
    common(ca, optional_spec=True)
    ca.add_argument("--preset", help="a named model instead of a spec file (refnet presets)")
    ca.add_argument("--precision", choices=["fp16", "bf16"], default="fp16")
    ca.add_argument("--policy", choices=["autocast", "half"], default="autocast")
    ca.add_argument("--loss-scale", type=_loss_scale, default=None,
                    help="static loss scale S in [2^-126, 2^126] (default 1); the gradients are "
                         "written unscaled (GradScaler's float32 inverse)")
    ca.add_argument("--loss-dtype", choices=["policy", "float32"], default="policy",
                    help="the policy's own loss (default) or loss_fn(output.float(), y)")
    ca.add_argument("--device", default="cuda",
                    help="torch device (default cuda; cpu runs torch's CPU kernels, not CUDA's)")
    ca.add_argument("--no-reduced-precision-reduction", action="store_true",
                    help="torch.backends.cuda.matmul.allow_fp16/bf16_reduced_precision_"
                         "reduction = False")
    ca.add_argument("--out", required=True, help="the .npz to write (THEIRS.npz)")
    ca.set_defaults(func=cmd_capture)

    pr = sub.add_parser("presets", help="list the named models diagnose --preset accepts")
    pr.set_defaults(func=cmd_presets)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:
        # One line, whatever the message (numpy's carry newlines).
        message = " ".join(str(e).split())
        print(f"refnet {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:      # Ctrl-C where nothing partial is kept
        print(f"refnet {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
