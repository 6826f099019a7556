"""A full-batch training loop that records what the vanishing/exploding-gradient story is about.

Per step it records:
- ``loss``;
- ``grad_norm[name]``: ‖∂L/∂θ‖₂ of every parameter tensor (before clipping), and
  ``total_grad_norm``, the global norm;
- ``update_ratio[name]``: ‖Δθ‖₂ / ‖θ‖₂ of the step (the "update-to-weight ratio");
- ``dead_fraction[layer]``: for every relu/leaky_relu/prelu layer, the fraction of its units that
  are *dead*: whose output is exactly 0 for every input of a fixed probe batch (the training batch
  by default), measured before the step. For leaky_relu and prelu with a nonzero slope the output
  is 0 only at z = 0 exactly, so the fraction is 0 by definition of the measure;
- ``nonfinite``: the parameters whose gradient holds inf or NaN.

Training stops at the first non-finite loss, naming the first layer (in forward order) whose output
holds inf or NaN (or "the loss" if every layer output is finite), and the step.

Order within a step (as a PyTorch loop would do it): forward and backward (with the spec's L1/L2
penalty in the loss, if any), clip (by value, then by global norm), optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from ..layers.base import ForwardState
from ..lowp.emulation import Precision, StorageArithmetic, cast_params, run
from ..lowp.gradscaler import GradScaler
from ..model import Model
from ..numerics.backend import FLOAT32, FLOAT64
from ..progress import SILENT, Interrupted
from .clip import clip_grad_norm, clip_grad_value, tensor_norm
from .optim import Optimizer

DEAD_TYPES = ("relu", "leaky_relu", "prelu")
LOG_LINES = 20          # progress in a log: about 20 lines per run, not one per step


@dataclass
class TrainResult:
    params: Dict[str, np.ndarray]
    history: List[dict]
    stopped: Optional[str] = None          # why training stopped early, or None
    steps_done: int = 0


def dead_fractions(outputs) -> Dict[str, float]:
    """Fraction of units of each relu-type layer whose output is 0 for every input of the pass
    that recorded ``outputs`` (``ForwardState.outputs``)."""
    fractions = {}
    for name, kind, out in outputs:
        if kind in DEAD_TYPES:
            out = np.asarray(out)
            dead = np.all(out.reshape(out.shape[0], -1) == 0, axis=0)
            fractions[name] = float(dead.mean())
    return fractions


def first_nonfinite(model: Model, params, x, y, state: ForwardState) -> str:
    """The first layer (forward order) whose output holds inf or NaN, or 'the loss'."""
    record = ForwardState(train=state.train, masks=state.masks, outputs=[])
    with np.errstate(all="ignore"):
        fwd = model.forward(FLOAT64, params, x, y, record)
    for name, kind, out in record.outputs:
        out = np.asarray(out)
        if not np.all(np.isfinite(out)):
            what = "NaN" if np.any(np.isnan(out)) else "inf"
            return f"layer {name} ({kind}) output holds {what}"
    return f"the loss ({float(fwd.loss)})"


def train(model: Model, params, x, y, optimizer: Optimizer, steps: int, *,
          clip_norm: Optional[float] = None, clip_value: Optional[float] = None,
          max_norm: Optional[float] = None, probe: Optional[np.ndarray] = None,
          precision: Optional[Precision] = None,
          scaler: Optional[GradScaler] = None, progress=None) -> TrainResult:
    """Full-batch training for ``steps`` steps; see the module docstring for what is recorded.

    ``max_norm``: the max-norm constraint on the regularized weights after every step.
    ``precision``: run every step under an fp16/bf16 policy (``refnet.lowp.emulation``): parameters
    held as float32 master weights (autocast) or in the storage format (half), and the optimizer
    set to compute in that dtype (``optimizer.bk``). ``scaler``: loss scaling with
    ``GradScaler``'s rules — unscale before clipping, skip the step on inf/NaN, update the scale;
    each record then has ``loss_scale`` and ``skipped``. ``progress``: a
    ``refnet.progress.Reporter`` told of every step (default silent). Ctrl-C raises
    ``refnet.progress.Interrupted`` whose ``partial`` is the TrainResult of the steps finished:
    their history and the parameters after the last of them, ``stopped`` saying so."""
    from ..regularize import max_norm_constraint
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"train: steps must be a positive integer, got {steps!r}")
    params, x, y = model.prepare(params, x, y)
    probe_x = x if probe is None else model.check_input(probe)
    probe_y = y if probe is None else model.loss.check_target(     # ("none": upstream ones)
        model.loss.default_targets(np.random.default_rng(0), probe_x.shape[0]), probe_x.shape[0])
    learnable = list(model.param_shapes())
    first = model.default_state()
    rng, train_mode = first.rng, first.train       # dropout: a fresh mask every step
    emulate = precision is not None and precision.emulated
    if scaler is not None and not emulate:
        raise ValueError("train: a GradScaler needs an fp16/bf16 precision policy "
                         "(float32 and float64 gradients do not underflow to need one)")
    if emulate:
        params = cast_params(params, precision)
        optimizer.bk = (FLOAT32 if precision.policy == "autocast"
                        else StorageArithmetic(precision.storage))
    history = []
    pending = params       # the parameters after the step being recorded (see below)
    progress = SILENT if progress is None else progress
    progress.start(steps, "steps", lines=LOG_LINES)
    step = 0
    try:
        for step in range(steps):
            state = ForwardState(train=train_mode, rng=rng, outputs=[])
            low = None
            with np.errstate(all="ignore"):
                if emulate:
                    scale = scaler.scale if scaler is not None else 1.0
                    low = run(model, precision, params, x, y, state, loss_scale=scale, cast=False)
                    loss = low.loss
                    grads = (scaler.unscale(low.scaled_grads) if scaler is not None
                             else dict(low.grads))
                else:
                    g = model.loss_and_grads(FLOAT64, params, x, y, state)
                    loss = float(g.loss)
                    grads = {k: np.asarray(v) for k, v in g.params.items()}
                outputs = state.outputs
                if probe is not None:       # a separate probe batch: one more forward pass
                    probe_state = ForwardState(train=train_mode, rng=np.random.default_rng(0),
                                               outputs=[])
                    model.forward(FLOAT64, _float64(params), probe_x, probe_y, probe_state)
                    outputs = probe_state.outputs
            record = {"step": step, "loss": loss, "dead_fraction": dead_fractions(outputs)}
            record["grad_norm"] = {k: tensor_norm(np.asarray(v, dtype=np.float64), 2)
                                   for k, v in grads.items()}
            record["total_grad_norm"] = tensor_norm(np.array(list(record["grad_norm"].values())), 2)
            record["nonfinite"] = [k for k, v in grads.items() if not np.all(np.isfinite(v))]
            if not math.isfinite(loss):
                history.append(record)
                where = (low.first_nonfinite() if low is not None
                         else first_nonfinite(model, params, x, y, state))
                return TrainResult(_float64(params), history, f"non-finite loss ({loss}) at step "
                                                              f"{step}: first non-finite value in "
                                                              f"{where}", step)
            if scaler is not None:
                record["loss_scale"], record["skipped"] = scale, scaler.found_inf
                skipped = scaler.found_inf
                scaler.update()
                if skipped:                  # GradScaler.step skips the optimizer step
                    record["update_ratio"] = {k: 0.0 for k in learnable}
                    pending = params
                    history.append(record)
                    progress.update(step + 1, f"loss {loss:.6g}, step skipped")
                    continue
            if clip_value is not None:
                grads = clip_grad_value(grads, clip_value)
            if clip_norm is not None:
                grads, _ = clip_grad_norm(grads, clip_norm)
            with np.errstate(all="ignore"):
                new = optimizer.step(params, {k: grads[k] for k in learnable})
            if max_norm is not None:
                new = max_norm_constraint(new, model.regularized, max_norm)
            new.update(state.updates)                       # running statistics of batchnorm
            before, after = _float64(params), _float64(new)
            record["update_ratio"] = {
                k: tensor_norm(after[k] - before[k], 2) / (tensor_norm(before[k], 2) or math.inf)
                for k in learnable}
            # A step is done when its record is in the history; Ctrl-C between the two lines
            # below still returns the parameters that go with the history (``pending``).
            pending = new if emulate else _float64(new)
            history.append(record)
            params = pending
            progress.update(step + 1, f"loss {loss:.6g}")
    except KeyboardInterrupt as stop:
        done = len(history)
        if done > step:        # this step's record made it in: so did its update
            params = pending
        message = f"interrupted after {done} of {steps} steps"
        raise Interrupted(message, TrainResult(_float64(params), history, message, done), done,
                          steps).with_traceback(stop.__traceback__) from None
    finally:
        progress.close()
    return TrainResult(_float64(params), history, None, steps)


def _float64(params):
    return {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
