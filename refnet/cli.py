"""Command line: ``refnet study``, ``refnet verify``, ``refnet grads``, ``refnet train``,
``refnet diagnose``, ``refnet presets``, ``refnet vectors``, ``refnet conformance`` (also
``python -m refnet``).

Exit status: 0 all checks pass, 1 a check fails (verify, vectors check, conformance), training
stopped on a non-finite loss (train) or inf/NaN appeared (diagnose), 2 bad input (the message
names what is wrong).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from . import __version__
from .backend import get_backend
from .io import load_data, load_params, save_gradients
from .model import Model
from .verify import LAMBDA, verify

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2


def _inputs(args):
    model = Model.load(args.spec)
    params = load_params(args.params) if args.params else None
    x = y = None
    if args.data:
        x, y = load_data(args.data)
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


def format_report(report, model: Model) -> str:
    lines = []
    n_checks = sum(t.fd_checks for t in report.tensors)
    lines.append(f"loss {report.loss!r} ({model.loss.type}, {model.loss.reduction}); "
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
    lines.append("")
    if report.passed:
        lines.append("PASSED: every gradient matches the exact one within its float64 error "
                     "bound, and the exact one matches high-precision finite differences.")
    else:
        failed = [t.name for t in report.tensors if not t.passed]
        lines.append(f"FAILED: {', '.join(failed)}")
    return "\n".join(lines)


def cmd_verify(args) -> int:
    model, params, x, y = _inputs(args)
    if args.certify:
        from dataclasses import asdict
        from .certify import certify, format_certificate
        c = certify(model, params, x, y, prec=args.prec, train=_train(args))
        if args.json:
            print(json.dumps({**asdict(c), "status": c.status}, indent=1))
        else:
            print(format_certificate(c))
        return EXIT_FAIL if c.failed else EXIT_OK
    report = verify(model, params, x, y, dps=args.dps, digits=args.digits, mode=args.mode,
                    directions=args.directions, seed=args.seed, train=_train(args))
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(format_report(report, model))
    return EXIT_OK if report.passed else EXIT_FAIL


def cmd_grads(args) -> int:
    model, params, x, y = _inputs(args)
    params, x, y = model.prepare(params, x, y)
    bk = get_backend(args.precision, args.dps)
    grads = model.loss_and_grads(bk, params, x, y, model.default_state(_train(args)))
    # mp results are written correctly rounded to float64 (npz holds no mpf without pickle).
    out_dtype = np.float32 if args.precision == "float32" else np.float64
    as_out = lambda a: bk.to_numpy(a).astype(out_dtype)
    save_gradients(args.out, as_out(grads.loss), {k: as_out(v) for k, v in grads.params.items()},
                   as_out(grads.x))
    print(f"loss {float(bk.to_numpy(grads.loss))!r}; wrote loss, grad/x and "
          f"{len(grads.params)} parameter gradients ({args.precision}) to {args.out}")
    return EXIT_OK


def cmd_train(args) -> int:
    import copy
    from .io import save_params
    from .optim import make_optimizer
    from .train import train
    model = Model.load(args.spec)
    if args.l1 is not None or args.l2 is not None:
        spec = copy.deepcopy(model.spec)
        reg = dict(spec.get("regularization", {}))
        reg.update({k: v for k, v in (("l1", args.l1), ("l2", args.l2)) if v is not None})
        spec["regularization"] = reg
        model = Model(spec)
    params = load_params(args.params) if args.params else None
    x = y = None
    if args.data:
        x, y = load_data(args.data)
    options = {"momentum": args.momentum} if args.optimizer == "sgd" else {}
    optimizer = make_optimizer(args.optimizer, args.lr, **options)
    precision = scaler = None
    if args.precision != "float64":
        from .gradscaler import GradScaler
        from .precision import Precision
        precision = Precision(args.precision, args.policy)
        if args.loss_scale == "dynamic":
            scaler = GradScaler()
        elif args.loss_scale is not None:
            scaler = GradScaler(init_scale=args.loss_scale, dynamic=False)
    elif args.loss_scale is not None:
        raise ValueError("--loss-scale needs --precision fp16 or bf16 (float64 gradients do "
                         "not underflow to need one)")
    result = train(model, params, x, y, optimizer, args.steps, clip_norm=args.clip_norm,
                   clip_value=args.clip_value, precision=precision, scaler=scaler)
    if args.save_params:
        save_params(args.save_params, result.params)
    if args.json:
        print(json.dumps({"stopped": result.stopped, "steps_done": result.steps_done,
                          "history": result.history}, indent=1, default=float))
    else:
        names = list(model.param_shapes())
        print(f"{'step':>5} {'loss':>12} {'|grad|':>9} {'first/last layer |grad|':>24} "
              f"{'dead relu':>9}")
        every = max(1, len(result.history) // 20)
        for h in result.history[::every] + ([result.history[-1]] if every > 1 else []):
            first, last = h["grad_norm"][names[0]], h["grad_norm"][names[-1]]
            ratio = first / last if last else math.inf
            dead = np.mean(list(h["dead_fraction"].values())) if h["dead_fraction"] else 0.0
            print(f"{h['step']:>5} {h['loss']:>12.6g} {h['total_grad_norm']:>9.3g} "
                  f"{ratio:>24.3g} {dead:>9.3f}")
        print(result.stopped or f"trained {result.steps_done} steps")
    return EXIT_FAIL if result.stopped else EXIT_OK


def _loss_scale(text):
    if text == "dynamic":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'dynamic', got {text!r}")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def cmd_diagnose(args) -> int:
    from .diagnose import diagnose, format_table
    from .precision import Precision
    from .presets import preset
    if (args.spec is None) == (args.preset is None):
        raise ValueError("give either a spec file or --preset NAME (refnet presets lists them)")
    if args.preset is not None:
        model = Model(preset(args.preset))
        params = load_params(args.params) if args.params else None
        x = y = None
        if args.data:
            x, y = load_data(args.data)
    else:
        model, params, x, y = _inputs(args)
    precision = Precision(args.precision, args.policy, args.accumulate)
    d = diagnose(model, precision, params, x, y, loss_scale=args.loss_scale, lr=args.lr,
                 train=_train(args))
    if args.json:
        print(json.dumps(d.as_json(), indent=1))
    else:
        print(format_table(d))
    if args.plot:
        try:
            from .plots import diagnose_figure
        except ImportError:
            raise ValueError("--plot needs matplotlib (pip install 'refnet[plot]')") from None
        diagnose_figure(d, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_FAIL if d.first_nonfinite else EXIT_OK


def cmd_vectors(args) -> int:
    from .vectors import check, write
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
    from .conformance import conformance, format_results
    results = conformance(args.dir, args.framework, args.dtype)
    if args.json:
        print(json.dumps({"framework": args.framework, "dtype": args.dtype,
                          "passed": all(v.passed for v in results),
                          "vectors": [asdict(v) for v in results]}, indent=1))
    else:
        print(format_results(results, args.dtype))
    return EXIT_OK if all(v.passed for v in results) else EXIT_FAIL


def cmd_presets(args) -> int:
    from .presets import PRESETS
    for name, spec in PRESETS.items():
        print(f"{name:<14} {spec.get('description', '')}")
    return EXIT_OK


def cmd_study(args) -> int:
    from pathlib import Path
    from .study import format_table, run_study, summary
    out = Path(args.out)
    results = run_study(quick=args.quick, out=out, check=not args.no_check)
    print(format_table(results))
    print()
    print(summary(results))
    written = sorted(p.name for p in out.iterdir())
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
    parser = argparse.ArgumentParser(prog="refnet", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"refnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, optional_spec=False):
        p.add_argument("spec", nargs="?" if optional_spec else None,
                       help="model spec (JSON, see spec/model-format.md)")
        p.add_argument("--params", help=".npz of parameters by torch name (default: the spec's inits)")
        p.add_argument("--data", help=".npz with x and y (default: a seeded batch)")
        p.add_argument("--dps", type=int, default=50, help="mp significant digits (default 50)")
        p.add_argument("--eval", action="store_true",
                       help="eval mode: running statistics in batchnorm, no dropout "
                            "(default: the spec's mode, train unless it says eval)")

    v = sub.add_parser("verify", help="prove every gradient three ways")
    common(v)
    v.add_argument("--json", action="store_true", help="the report as JSON")
    v.add_argument("--digits", type=float, default=20.0,
                   help="digits of agreement required between mp analytic and mp FD (default 20)")
    v.add_argument("--mode", choices=["auto", "element", "direction"], default="auto",
                   help="FD per element or along random directions (default: auto by size)")
    v.add_argument("--directions", type=int, default=2, help="random directions per tensor")
    v.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    v.add_argument("--certify", action="store_true",
                   help="instead: enclose every gradient element in a proven interval "
                        "(interval arithmetic; exit 1 only if an enclosure excludes the "
                        "high-precision value, 0 when certified or not certifiable at a kink)")
    v.add_argument("--prec", type=int, default=150,
                   help="interval precision in bits for --certify (default 150)")
    v.set_defaults(func=cmd_verify)

    g = sub.add_parser("grads", help="write the loss and every gradient to an .npz")
    common(g)
    g.add_argument("--precision", choices=["float64", "float32", "mp"], default="float64")
    g.add_argument("--out", required=True, help="output .npz")
    g.set_defaults(func=cmd_grads)

    t = sub.add_parser("train", help="full-batch training with per-step gradient health")
    t.add_argument("spec", help="model spec (JSON)")
    t.add_argument("--params", help=".npz of initial parameters")
    t.add_argument("--data", help=".npz with x and y (default: the spec's seeded batch)")
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--lr", type=float, required=True)
    t.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd")
    t.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    t.add_argument("--clip-norm", type=float, help="clip the global gradient norm to this")
    t.add_argument("--clip-value", type=float, help="clip every gradient element to ±this")
    t.add_argument("--l1", type=float, help="L1 penalty α (α·Σ|w| over weights)")
    t.add_argument("--l2", type=float, help="L2 penalty α (α/2·Σw² over weights)")
    t.add_argument("--save-params", help="write the final parameters (torch names) here")
    t.add_argument("--precision", choices=["float64", "float32", "fp16", "bf16"],
                   default="float64", help="train under the fp16/bf16 emulation (refnet.precision)")
    t.add_argument("--policy", choices=["autocast", "half"], default="autocast")
    t.add_argument("--loss-scale", type=_loss_scale, default=None,
                   help="GradScaler: a static scale S, or 'dynamic' (2^16, torch's rules)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("diagnose", help="per-layer overflow/underflow in fp16/bf16 against a "
                                        "float64 shadow run")
    common(d, optional_spec=True)
    d.add_argument("--preset", help="a named model instead of a spec file (refnet presets)")
    d.add_argument("--plot", help="write a per-layer figure to this PNG (needs matplotlib)")
    d.add_argument("--precision", choices=["fp16", "bf16", "fp8_e5m2", "fp8_e4m3fn", "float32",
                                           "float64"], default="fp16")
    d.add_argument("--policy", choices=["autocast", "half"], default="autocast",
                   help="autocast: float32 master weights, float32 loss (default); "
                        "half: everything in the storage format (model.half())")
    d.add_argument("--accumulate", choices=["float32", "storage"], default="float32",
                   help="float32 accumulation as tensor cores (default), or every partial sum "
                        "rounded to the storage format")
    d.add_argument("--loss-scale", type=_loss_scale, default=1.0,
                   help="static loss scale S, or 'dynamic' (GradScaler: 2^16, halved until clean)")
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
                         "12, float64 and fp16): under a minute")
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
    co.add_argument("--framework", default="torch", help="torch (the only one built in)")
    co.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    co.add_argument("--dir", default="spec/vectors", help="vector directory (spec/vectors)")
    co.add_argument("--json", action="store_true")
    co.set_defaults(func=cmd_conformance)

    pr = sub.add_parser("presets", help="list the named models diagnose --preset accepts")
    pr.set_defaults(func=cmd_presets)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"refnet {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"refnet {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
