"""Per-layer gradient health under a precision policy, accounted against a float64 shadow run.

``diagnose(model, precision, ...)`` runs the model twice on the same parameters, data and
dropout masks: once in float64 (the shadow) and once under the policy (``refnet.lowp.emulation``).
For every tensor — each layer's forward output (``"<layer>.out"``), each parameter gradient (the
parameter's name), the input gradient (``"x.grad"``) and the weight update of one SGD step
(``"<param>.update"``) — it counts, in the low-precision tensor:

===========  ==========================================================================
overflow     ±inf here where float64 is finite
nan          NaN here
underflow    0 here where float64 is nonzero and finite
subnormal    nonzero values below the storage format's smallest normal number
max_abs      max |v| here (and ``max_abs_float64`` in the shadow)
rel_err      percentiles 50/90/99/100 of |v − v64|/|v64| over elements finite in both with
             v64 ≠ 0 (an underflowed element counts as 1)
===========  ==========================================================================

and names the first place where inf or NaN appears (forward in layer order, then the loss, then
backward in backward order).

Gradients are compared after unscaling (float32 inverse scale, as ``GradScaler.unscale_``), so
a loss scale shows up as fewer underflows. ``loss_scale="dynamic"`` runs GradScaler's opening
moves: start at 2¹⁶ and halve, skipping the step, until a pass is free of inf/NaN (at most 64
halvings); the report gives the scale reached and the passes skipped.

The weight update is one SGD step θ − lr·g in the dtype the policy keeps parameters in (float32
master weights under autocast, the storage format under half), against float64's −lr·g;
``lr`` defaults to 0.01 (a named choice: it only sets where small updates vanish against θ).

**Values, not only counts** (``compare=``, ``refnet diagnose … --compare THEIRS.npz``): the
emulated gradients held against gradients captured from a GPU run of the same model, data and
loss scale (``check_compare`` reads them: every parameter's torch name, optionally ``x``). Per
tensor: how many elements are equal (the unscaled values; ±0 count as equal, and NaN as equal
to NaN), the largest distance in units in the last place of the format the emulation stored the
tensor in, counted at the *scaled* values (both sides × S, on that format's grid: the grid the
GPU computed on), and the first index where they differ.

Gradients through time: for a model with recurrent layers (rnn, lstm, gru), ``Diagnosis.steps``
holds, per recurrent layer and per layer k inside it, the profile over the time steps
t = 0 … T−1 of ‖∂L/∂h_t‖₂ (``"dh"``) and, for lstm, ‖∂L/∂c_t‖₂ (``"dc"``): the total gradients
the backward pass hands to step t (from above and from step t + 1), over the whole batch, in the
run's precision (as stored between steps, unscaled like the parameter gradients) and in the
float64 shadow, with each step's underflow, overflow and NaN counts. The shadow records them
with :class:`StepRecorder` (float64 arithmetic bit for bit; ``refnet.lowp.steps`` pairs every
per-step value, gate gradients included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import numpy as np

from ..layers.base import ForwardState
from ..numerics.backend import LayerScope, NumpyBackend
from ..numerics.formats import FLOAT32, get_format, ordinal, round_to
from ..progress import SILENT
from .emulation import (
    LowPrecisionRun,
    Precision,
    check_loss_scale,
    dtype_name,
    format_of,
    plain,
    run,
    store,
)
from .gradscaler import GradScaler

PERCENTILES = (50, 90, 99, 100)
DEFAULT_LR = 0.01
MAX_BACKOFFS = 64
STEP_KINDS = ("dh", "dc")       # the per-step state gradients profiled: ∂L/∂h_t, ∂L/∂c_t


@dataclass
class TensorHealth:
    name: str
    kind: str                # activation | param_grad | input_grad | update
    dtype: str
    numel: int
    overflow: int
    nan: int
    underflow: int
    subnormal: int
    max_abs: float
    max_abs_float64: float
    rel_err: Dict[str, Optional[float]]
    norm: float = 0.0                  # ‖v‖₂ (unscaled), computed in float64
    norm_float64: float = 0.0

    def as_json(self) -> dict:
        d = dict(self.__dict__)
        for key in ("max_abs", "max_abs_float64", "norm", "norm_float64"):
            d[key] = _json_number(d[key])
        d["rel_err"] = {k: _json_number(v) for k, v in self.rel_err.items()}
        return d


def _json_number(v):
    """inf and NaN as strings: JSON has no literal for them."""
    if v is None or (isinstance(v, float) and math.isfinite(v)):
        return v
    return str(v)


@dataclass
class TensorComparison:
    """One gradient, the emulation's against a GPU run's (``compare_gradients``)."""
    name: str                   # the parameter's torch name, or "x" (the input gradient)
    dtype: str                  # the format the emulation stored it in: its ulps are these
    numel: int
    equal: int                  # elements equal after unscaling (±0 equal, NaN equal to NaN)
    max_ulps: Optional[float]   # largest distance over elements finite on both sides (None: none)
    nonfinite_mismatch: int     # elements inf/NaN on one side only, or different inf/NaN
    off_grid: int               # theirs × S not a value of the format (a lossy capture)
    first_difference: Optional[dict] = None    # {"index", "ours", "theirs", "ulps"}

    @property
    def equal_fraction(self) -> float:
        return self.equal / self.numel if self.numel else 1.0

    def as_json(self) -> dict:
        d = dict(self.__dict__)
        d["equal_fraction"] = self.equal_fraction
        d["max_ulps"] = _json_number(self.max_ulps)
        if self.first_difference is not None:
            d["first_difference"] = {k: (_json_number(v) if isinstance(v, float) else v)
                                     for k, v in self.first_difference.items()}
        return d


@dataclass
class Diagnosis:
    precision: Precision
    loss: float
    loss_float64: float
    loss_scale: float
    skipped_steps: int
    first_nonfinite: Optional[str]
    tensors: List[TensorHealth] = field(default_factory=list)
    lr: float = DEFAULT_LR
    comparison: Optional[List[TensorComparison]] = None
    steps: List["StepProfile"] = field(default_factory=list)    # recurrent layers only

    def as_json(self) -> dict:
        d = {"precision": self.precision.storage, "policy": self.precision.policy,
             "accumulate": self.precision.accumulate, "loss_dtype": self.precision.loss_dtype,
             "loss": _json_number(self.loss), "loss_float64": _json_number(self.loss_float64),
             "loss_scale": self.loss_scale, "skipped_steps": self.skipped_steps,
             "first_nonfinite": self.first_nonfinite, "lr": self.lr,
             "tensors": [t.as_json() for t in self.tensors],
             "steps": [p.as_json() for p in self.steps]}
        if self.comparison is not None:
            d["compare"] = [c.as_json() for c in self.comparison]
        return d


@dataclass
class StepProfile:
    """One recurrent layer's ‖∂L/∂h_t‖₂ (``kind`` "dh") or ‖∂L/∂c_t‖₂ ("dc") of its layer ``k``
    at every time step: entry t of each list is step t (t = 0 first, the earliest step; the
    loss of an ``"output": "last"`` layer enters at t = T−1). ``norm``: in the run's precision,
    unscaled; ``norm_float64``: the shadow's; ``underflow`` / ``overflow`` / ``nan``: element
    counts at each step, as ``TensorHealth`` counts them; ``numel``: elements per step (N·H)."""
    layer: str
    layer_type: str
    kind: str
    k: int
    norm: List[float]
    norm_float64: List[float]
    underflow: List[int]
    overflow: List[int]
    nan: List[int]
    numel: int

    @property
    def label(self) -> str:
        symbol = {"dh": "∂L/∂h_t", "dc": "∂L/∂c_t"}[self.kind]
        return f"{self.layer} ({self.layer_type}) l{self.k} ‖{symbol}‖"

    def as_json(self) -> dict:
        d = dict(self.__dict__)
        d["norm"] = [_json_number(v) for v in self.norm]
        d["norm_float64"] = [_json_number(v) for v in self.norm_float64]
        return d


class StepRecorder(LayerScope, NumpyBackend):
    """float64 (or float32) arithmetic, bit for bit the plain backend's, that keeps a copy of
    every per-step value a recurrent layer hands to ``store_step``: ``steps`` is a list of
    (layer name, layer type, kind, layer k, step t, value), in the order they were computed."""

    def __init__(self, dtype=np.float64):
        super().__init__(dtype)
        self.name = f"{self.dtype.name} recording steps"
        self.steps: List[tuple] = []

    def store_step(self, a, kind, k, t):
        layer = self.layer
        self.steps.append((layer.name, layer.type, kind, k, t, np.array(a)))
        return a


def step_profiles(reference, stored, inv_scale=None) -> List[StepProfile]:
    """The ``STEP_KINDS`` profiles from two recordings of the same pass (lists of (layer name,
    layer type, kind, k, t, value), as :class:`StepRecorder` and the emulation's trace keep
    them): ``reference`` the float64 shadow, ``stored`` the run under the policy. ``inv_scale``:
    the float32 inverse loss scale of an emulated run; its stored gradients are multiplied by it
    in float32 before counting, as ``refnet.lowp.steps.step_health`` and GradScaler unscale."""
    ref = {entry[:5]: entry[5] for entry in reference}
    series: Dict[tuple, dict] = {}
    for name, layer_type, kind, k, t, value in stored:
        if kind not in STEP_KINDS:
            continue
        low = np.asarray(plain(value))
        if inv_scale is not None:
            with np.errstate(all="ignore"):
                low = low * inv_scale
        health = tensor_health(f"{name}.{kind}[l{k}, t={t}]", "step", low,
                               ref[(name, layer_type, kind, k, t)], stored=value)
        series.setdefault((name, layer_type, kind, k), {})[t] = health
    layers = list(dict.fromkeys(entry[0] for entry in reference))   # the layers' forward order
    profiles = []
    for (name, layer_type, kind, k), by_t in sorted(
            series.items(), key=lambda item: (layers.index(item[0][0]), item[0][3],
                                              STEP_KINDS.index(item[0][2]))):
        ts = sorted(by_t)
        rows = [by_t[t] for t in ts]
        profiles.append(StepProfile(name, layer_type, kind, k, [h.norm for h in rows],
                                    [h.norm_float64 for h in rows],
                                    [h.underflow for h in rows], [h.overflow for h in rows],
                                    [h.nan for h in rows], rows[0].numel))
    return profiles


def smallest_normal(name: str) -> float:
    """The smallest normal number of a dtype named as torch does (float16, bfloat16, ...)."""
    if name in ("float64", "float32"):
        return float(np.finfo(name).tiny)
    return get_format({"float16": "fp16", "bfloat16": "bf16", "float8_e5m2": "fp8_e5m2",
                       "float8_e4m3fn": "fp8_e4m3fn"}[name]).smallest_normal


def tensor_health(name, kind, low, ref, stored=None) -> TensorHealth:
    """The counts of the table above for one tensor: ``low`` as the run has it (unscaled),
    ``ref`` the float64 shadow; ``stored`` the tensor as it was stored (a scaled gradient),
    which decides the reported dtype and the subnormal count. Default: ``low`` itself."""
    stored = low if stored is None else stored
    dtype = dtype_name(stored)
    tiny = smallest_normal(dtype)
    stored_abs = np.abs(np.asarray(plain(stored), dtype=np.float64))
    low = np.asarray(plain(low), dtype=np.float64).reshape(-1)
    ref = np.asarray(plain(ref), dtype=np.float64).reshape(-1)
    finite_ref = np.isfinite(ref)
    both = np.isfinite(low) & finite_ref & (ref != 0)
    with np.errstate(all="ignore"):
        rel = np.abs(low[both] - ref[both]) / np.abs(ref[both])
    rel_err = {f"p{q}": (float(np.percentile(rel, q)) if rel.size else None) for q in PERCENTILES}
    absolute = np.abs(low)
    return TensorHealth(
        name=name, kind=kind, dtype=dtype, numel=int(low.size),
        overflow=int(np.sum(np.isinf(low) & finite_ref)),
        nan=int(np.sum(np.isnan(low))),
        underflow=int(np.sum((low == 0) & (ref != 0) & finite_ref)),
        subnormal=int(np.sum((stored_abs > 0) & (stored_abs < tiny))),
        max_abs=float(np.max(absolute)) if low.size else 0.0,
        max_abs_float64=float(np.max(np.abs(ref))) if ref.size else 0.0,
        rel_err=rel_err, norm=l2_norm(low), norm_float64=l2_norm(ref))


def l2_norm(v) -> float:
    """‖v‖₂ of a flat float64 array without overflow or underflow of the squares (scaled by
    max |v|); inf or NaN where v holds them."""
    with np.errstate(all="ignore"):
        if v.size == 0:
            return 0.0
        m = float(np.max(np.abs(v)))
        if not math.isfinite(m):
            return math.nan if np.isnan(v).any() else math.inf
        return m * float(np.sqrt(np.sum((v / m) ** 2))) if m > 0 else 0.0


def _sgd_update(param_held, grad_unscaled, lr):
    """θ_new − θ of one SGD step in the dtype the parameter is held in: (step as float64, that
    dtype). The step is exact in float64, and representable in the held dtype but for rare
    subnormal edge cases."""
    fmt = format_of(param_held)
    with np.errstate(all="ignore"):
        g = store(grad_unscaled, fmt)
        new = param_held - lr * g          # storage-format arithmetic: one rounding per op
        step = np.asarray(plain(new), dtype=np.float64) - np.asarray(plain(param_held),
                                                                      dtype=np.float64)
    return step, fmt


def diagnose(model, precision: Precision, params=None, x=None, y=None,
             loss_scale: Union[float, str] = 1.0, lr: float = DEFAULT_LR,
             train: Optional[bool] = None, progress=None,
             compare: Optional[Dict[str, np.ndarray]] = None) -> Diagnosis:
    """The accounting of the module docstring. ``train``: None for the spec's mode.
    ``progress``: a ``refnet.progress.Reporter`` told of every pass of dynamic loss scaling
    (default silent; a static scale is one pass). ``compare``: gradients captured from a GPU
    run, as ``check_compare`` returns them: the report then holds ``comparison``."""
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr)
            and lr > 0):
        raise ValueError(f"diagnose: lr must be a positive finite number, got {lr!r}")
    if loss_scale != "dynamic":
        if isinstance(loss_scale, str):
            raise ValueError(f"diagnose: loss scale must be a positive number or 'dynamic', "
                             f"got {loss_scale!r}")
        loss_scale = check_loss_scale(loss_scale)
    params, x, y = model.prepare(params, x, y)
    shadow_state = model.default_state(train)
    shadow_state.outputs = []
    recorder = StepRecorder()              # float64, bit for bit; it keeps recurrent steps
    with np.errstate(all="ignore"):
        shadow = model.loss_and_grads(recorder, params, x, y, shadow_state)

    def low_run(scale) -> LowPrecisionRun:
        state = ForwardState(train=shadow_state.train, rng=None, masks=shadow_state.masks,
                             outputs=[])
        return run(model, precision, params, x, y, state, loss_scale=scale)

    skipped = 0
    if loss_scale == "dynamic":
        scaler = GradScaler()
        progress = SILENT if progress is None else progress
        progress.start(None, "passes")      # how many: known only when one comes out clean
        try:
            while True:
                progress.update(skipped, f"pass {skipped + 1} at loss scale {scaler.scale:g}")
                result = low_run(scaler.scale)
                scaler.unscale(result.scaled_grads)
                if not scaler.found_inf or skipped >= MAX_BACKOFFS:
                    break
                scaler.update()
                skipped += 1
            progress.update(skipped + 1, f"loss scale {scaler.scale:g} " + (
                "still has inf/NaN" if scaler.found_inf else "is clean"))
        finally:
            progress.close()
        scale = scaler.scale
    else:
        scale = float(loss_scale)
        result = low_run(scale)

    tensors = []
    for (name, kind, out), (_, _, ref) in zip(result.outputs, shadow_state.outputs):
        tensors.append(tensor_health(f"{name}.out", "activation", out, ref))
    for name, g in result.grads.items():
        tensors.append(tensor_health(name, "param_grad", g, shadow.params[name],
                                     stored=result.scaled_grads[name]))
    tensors.append(tensor_health("x.grad", "input_grad", result.x_grad, shadow.x,
                                 stored=result.x_grad_stored))
    for name, g in result.grads.items():
        step, held_fmt = _sgd_update(result.params[name], g, lr)
        tensors.append(tensor_health(f"{name}.update", "update", step,
                                     -lr * np.asarray(shadow.params[name]),
                                     stored=store(step, held_fmt)))
    steps = []
    if recorder.steps:                     # a recurrent layer: its gradients through time
        if precision.emulated:
            stored = result.trace.steps
            inv_scale = np.float32(1.0 / np.float64(np.float32(scale)))   # GradScaler's
        elif precision.storage == "float64":
            stored, inv_scale = recorder.steps, None
        else:                              # float32: the plain backend records nothing
            again = StepRecorder(np.float32)
            with np.errstate(all="ignore"):
                model.loss_and_grads(again, params, x, y, ForwardState(
                    train=shadow_state.train, rng=None, masks=shadow_state.masks))
            stored, inv_scale = again.steps, None
        steps = step_profiles(recorder.steps, stored, inv_scale)
    comparison = None if compare is None else compare_gradients(model, result, compare)
    return Diagnosis(precision, result.loss, float(shadow.loss), scale, skipped,
                     result.first_nonfinite(), tensors, lr, comparison=comparison, steps=steps)


# --- values, not only counts: the emulation against a GPU run ---------------------------------
COMPARE_FLOAT_DTYPES = ("float16", "float32", "float64")
# Keys ``refnet grads --out`` writes beside the gradients, so that its own file can be compared:
# they describe the run and are not compared.
GRADS_FILE_KEYS = ("loss", "losses", "loss_scale", "precision", "policy", "accumulate",
                   "loss_dtype")


def check_compare(model, arrays: Dict[str, np.ndarray], source: str,
                  batch: Optional[int] = None) -> Dict[str, np.ndarray]:
    """The gradients of a GPU run (``arrays``, an .npz read without unpickling) checked against
    ``model`` before any work: keys are the parameters' names (torch's, or refnet's; ``grad/``
    before a name is allowed, as ``refnet grads --out`` writes it), every parameter present,
    optionally ``x`` (the input gradient, (``batch``, *input_shape)); each a float16/float32/
    float64 array of the parameter's shape, holding the *unscaled* gradient. Returns {refnet
    name or "x": float64 array}. ``source`` names the file in the messages."""
    named = {}
    for key, value in arrays.items():
        name = key[len("grad/"):] if key.startswith("grad/") else key
        if name in GRADS_FILE_KEYS or key.startswith("dtype/"):
            continue
        if name in named:
            raise ValueError(f"{source}: {name!r} is given twice (as {name!r} and 'grad/{name}')")
        named[name] = value
    x = named.pop("x", None)
    shapes = model.param_shapes()
    refnet = model.refnet_keys(named)
    unknown = sorted(k for k, r in refnet.items() if r not in shapes)
    if unknown:
        raise ValueError(f"{source}: unknown tensor name(s) {unknown[:5]}; expected the model's "
                         f"parameter names (torch names, e.g. {model.torch_name(next(iter(shapes)))!r})"
                         f" and optionally 'x'")
    given = {refnet[k]: v for k, v in named.items()}
    missing = [model.torch_name(n) for n in shapes if n not in given]
    if missing:
        raise ValueError(f"{source}: missing the gradient(s) of {missing[:5]}"
                         f"{' and more' if len(missing) > 5 else ''}; expected every parameter "
                         f"of the model ({len(shapes)})")
    checked = {}
    x_shape = (batch if batch is not None else "N",) + tuple(model.input_shape)
    for name, value in list(given.items()) + ([("x", x)] if x is not None else []):
        label = "x" if name == "x" else model.torch_name(name)
        value = np.asarray(value)
        if value.dtype.name not in COMPARE_FLOAT_DTYPES:
            raise ValueError(f"{source}: {label} must be a float16, float32 or float64 array (a "
                             f"bfloat16 gradient saved as .float()), got dtype {value.dtype}")
        if name == "x":
            if (value.ndim != len(x_shape) or tuple(value.shape[1:]) != x_shape[1:]
                    or (batch is not None and value.shape[0] != batch)):
                raise ValueError(f"{source}: x must have shape ({', '.join(map(str, x_shape))}) "
                                 f"(the input gradient of the batch), got {tuple(value.shape)}")
        elif tuple(value.shape) != tuple(shapes[name]):
            raise ValueError(f"{source}: {label} must have shape {tuple(shapes[name])}, got "
                             f"{tuple(value.shape)}")
        checked[name] = value.astype(np.float64)
    return checked


def _format_of_dtype(dtype: str):
    return FLOAT32 if dtype == "float32" else {
        "float16": "fp16", "bfloat16": "bf16", "float8_e5m2": "fp8_e5m2",
        "float8_e4m3fn": "fp8_e4m3fn"}[dtype]


def compare_tensor(name, ours, theirs, dtype: str, loss_scale: float) -> TensorComparison:
    """One tensor's comparison (the module docstring): ``ours`` and ``theirs`` unscaled,
    ``dtype`` the format the emulation stored ours in, ``loss_scale`` S."""
    a = np.asarray(ours, dtype=np.float64).reshape(-1)
    b = np.asarray(theirs, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"compare: {name} has {b.size} elements, the emulation {a.size}")
    equal = (a == b) | (np.isnan(a) & np.isnan(b))
    finite = np.isfinite(a) & np.isfinite(b)
    fmt = _format_of_dtype(dtype)
    with np.errstate(all="ignore"):
        a_s, b_s = a[finite] * loss_scale, b[finite] * loss_scale      # the stored, scaled values
        a_g, b_g = round_to(a_s, fmt), round_to(b_s, fmt)
        ulps = np.abs(ordinal(a_g, fmt) - ordinal(b_g, fmt))
    all_ulps = np.full(a.shape, np.inf)
    all_ulps[finite] = ulps
    first = None
    differ = np.flatnonzero(~equal)
    if differ.size:
        i = int(differ[0])
        first = {"index": [int(j) for j in np.unravel_index(i, np.shape(ours))],
                 "ours": float(a[i]), "theirs": float(b[i]), "ulps": float(all_ulps[i])}
    return TensorComparison(
        name=name, dtype=dtype, numel=int(a.size), equal=int(np.sum(equal)),
        max_ulps=float(np.max(ulps)) if ulps.size else None,
        nonfinite_mismatch=int(np.sum(~finite & ~equal)),
        off_grid=int(np.sum(b_g != b_s)), first_difference=first)


def compare_gradients(model, result: LowPrecisionRun,
                      theirs: Dict[str, np.ndarray]) -> List[TensorComparison]:
    """Every gradient of ``theirs`` (``check_compare``'s dict) against the run's, in the model's
    parameter order, then ``x``."""
    out = []
    for name in model.param_shapes():
        out.append(compare_tensor(model.torch_name(name), result.grads[name], theirs[name],
                                  dtype_name(result.scaled_grads[name]), result.loss_scale))
    if "x" in theirs:
        if np.shape(theirs["x"]) != np.shape(result.x_grad):
            raise ValueError(f"compare: x must have shape {tuple(np.shape(result.x_grad))} (the "
                             f"batch's input gradient), got {tuple(np.shape(theirs['x']))}")
        stored = result.x_grad_stored if result.x_grad_stored is not None else result.x_grad
        out.append(compare_tensor("x", result.x_grad, theirs["x"], dtype_name(stored),
                                  result.loss_scale))
    return out


def format_comparison(rows: List[TensorComparison], source: str) -> str:
    """The comparison as text (``refnet diagnose --compare``)."""
    lines = [f"compared with {source}: equal = unscaled values equal; ulps = steps of the "
             f"format each tensor was stored in, at the scaled values", ""]
    header = (f"{'tensor':<22} {'dtype':<8} {'numel':>7} {'equal':>8} {'max ulps':>9} "
              f"{'inf/nan':>7}  first difference")
    lines += [header, "-" * len(header)]
    for c in rows:
        first = "-"
        if c.first_difference is not None:
            f = c.first_difference
            first = (f"[{', '.join(map(str, f['index']))}]: ours {f['ours']:.6g}, theirs "
                     f"{f['theirs']:.6g} ({_num_ulps(f['ulps'])} ulps)")
        lines.append(f"{c.name:<22} {c.dtype:<8} {c.numel:>7} "
                     f"{100.0 * c.equal_fraction:>7.2f}% {_num_ulps(c.max_ulps):>9} "
                     f"{c.nonfinite_mismatch:>7}  {first}")
    off = sum(c.off_grid for c in rows)
    if off:
        lines.append(f"note: {off} of their values times the loss scale are not values of the "
                     f"format (a capture that was not the stored gradient divided by S?)")
    return "\n".join(lines)


def _num_ulps(v):
    if v is None:
        return "-"
    return "inf" if not math.isfinite(v) else f"{v:.0f}"


def format_table(d: Diagnosis) -> str:
    """The per-layer table, forward then backward, as text."""
    lines = [f"precision {d.precision}; loss {d.loss:.6g} (float64 {d.loss_float64:.6g}); "
             f"loss scale {d.loss_scale:g}" + (f" ({d.skipped_steps} steps skipped by dynamic "
                                               f"scaling)" if d.skipped_steps else ""),
             f"first inf/NaN: {d.first_nonfinite or 'none'}", ""]
    header = (f"{'tensor':<22} {'kind':<10} {'dtype':<8} {'numel':>7} {'overflow':>8} "
              f"{'nan':>6} {'underflow':>9} {'subnorm':>7} {'max|v|':>9} {'f64 max':>9} "
              f"{'relerr50':>8} {'relerr99':>8}")
    lines += [header, "-" * len(header)]
    for t in d.tensors:
        lines.append(f"{t.name:<22} {t.kind:<10} {t.dtype:<8} {t.numel:>7} {t.overflow:>8} "
                     f"{t.nan:>6} {_pct(t.underflow, t.numel):>9} {t.subnormal:>7} "
                     f"{t.max_abs:>9.2e} {t.max_abs_float64:>9.2e} "
                     f"{_num(t.rel_err['p50']):>8} {_num(t.rel_err['p99']):>8}")
    if d.steps:
        lines += [""] + format_steps(d)
    return "\n".join(lines)


def format_steps(d: Diagnosis) -> List[str]:
    """The gradients through time: per profile, the first/last ratio and the steps lost
    entirely; then one row per step t with every profile's float64 norm, its norm in the run's
    precision and the underflow there."""
    low = d.precision.storage
    lines = [f"gradients through time: ‖·‖₂ over the batch at each step t (t = 0 the earliest), "
             f"float64 and {low}; unf: elements 0 in {low}, nonzero in float64"]
    for p in d.steps:
        first, last = p.norm_float64[0], p.norm_float64[-1]
        ratio = f"{first / last:.1e}" if last > 0 and math.isfinite(first / last) else "-"
        dead = [t for t, u in enumerate(p.underflow) if u == p.numel]
        lost = (f"; in {low} {len(dead)} steps entirely 0 (t = {_ranges(dead)})" if dead else "")
        bad = [t for t, (o, n) in enumerate(zip(p.overflow, p.nan)) if o or n]
        lost += f"; inf/NaN at t = {_ranges(bad)}" if bad else ""
        lines.append(f"  {p.label}: t = 0 / t = {len(p.norm) - 1}: {ratio} (float64){lost}")
    width = 27
    lines.append(f"{'':>4}" + "".join(f" | {p.label[:width - 1]:<{width - 1}}" for p in d.steps))
    lines.append(f"{'t':>4}" + "".join(f" | {'float64':>9} {low:>9} {'unf':>6}"
                                        for _ in d.steps))
    lines.append("-" * len(lines[-1]))
    for t in range(max(len(p.norm) for p in d.steps)):
        row = f"{t:>4}"
        for p in d.steps:
            row += (f" | {p.norm_float64[t]:>9.2e} {p.norm[t]:>9.2e} "
                    f"{_pct(p.underflow[t], p.numel):>6}" if t < len(p.norm) else
                    f" | {'':>{width - 1}}")
        lines.append(row)
    return lines


def _ranges(ts: List[int]) -> str:
    """0, 1, 2, 5 -> "0–2, 5"."""
    out, start = [], None
    for i, t in enumerate(ts):
        if start is None:
            start = t
        if i + 1 == len(ts) or ts[i + 1] != t + 1:
            out.append(f"{start}" if start == t else f"{start}–{t}")
            start = None
    return ", ".join(out)


def _pct(count, total):
    return f"{count}" if count == 0 else f"{100.0 * count / total:.1f}%"


def _num(v):
    return "-" if v is None else f"{v:.1e}"
