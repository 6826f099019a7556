"""Per-step accounting of recurrent layers: every state and state gradient of every time step,
under a precision policy, against the same step of a float64 shadow run.

A recurrent layer (``refnet.layers.recurrent``) hands each per-step value to its backend's
``store_step`` — h_t and c_t after step t, the total ∂L/∂h_t and ∂L/∂c_t, the gate gradients.
Under the fp16/bf16 emulation the recurrent kernel stores them in its format and records them
(``Trace.steps``); :class:`StepRecorder` is the float64 (or float32) backend that records the
same values unchanged. ``step_health`` pairs the two runs' records, step by step, and counts in
each what ``refnet.lowp.diagnose.tensor_health`` counts for a whole tensor (overflow, NaN,
underflow where float64 is nonzero, subnormals, max |v|, ‖v‖₂, relative errors): where along
the sequence an fp16 gradient dies, and from which step back everything is zero.

Gradients are compared unscaled (the stored value times the float32 inverse loss scale, as
``diagnose`` unscales parameter gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from ..layers.base import ForwardState
from .diagnose import StepRecorder, TensorHealth, tensor_health
from .emulation import Precision, check_loss_scale, plain, run

GRADIENT_KINDS = ("dh", "dc", "dz", "dz_hh")
# StepRecorder is defined in .diagnose, whose float64 shadow run records the steps too (diagnose
# importing this module would be a circle); it is this module's as before.
__all__ = ["GRADIENT_KINDS", "StepRecorder", "StepHealth", "step_health"]


@dataclass
class StepHealth:
    layer: str              # the layer's name ("0", "3.body.1")
    layer_type: str         # rnn | lstm | gru
    kind: str               # h, c, dh, dc, dz, dz_hh
    k: int                  # the layer index inside the recurrent layer (num_layers)
    t: int                  # the time step
    health: TensorHealth

    def as_json(self) -> dict:
        return {"layer": self.layer, "layer_type": self.layer_type, "kind": self.kind,
                "k": self.k, "t": self.t, **self.health.as_json()}


def step_health(model, precision: Precision, params=None, x=None, y=None,
                loss_scale: float = 1.0, train: Optional[bool] = None) -> List[StepHealth]:
    """Every per-step value of every recurrent layer under ``precision``, against float64: one
    :class:`StepHealth` per (layer, kind, k, t), in the order the steps ran (forward, then
    backward from the last step)."""
    loss_scale = check_loss_scale(loss_scale)
    params, x, y = model.prepare(params, x, y)
    state = model.default_state(train)
    shadow = StepRecorder()
    with np.errstate(all="ignore"):
        model.loss_and_grads(shadow, params, x, y, state)
        low = run(model, precision, params, x, y,
                  ForwardState(train=state.train, rng=None, masks=state.masks),
                  loss_scale=loss_scale)
    stored = low.trace.steps if precision.emulated else None
    if stored is None:           # float32/float64: the plain backend records nothing; rerun
        plain_bk = StepRecorder(np.float64 if precision.storage == "float64" else np.float32)
        with np.errstate(all="ignore"):
            model.loss_and_grads(plain_bk, params, x, y,
                                 ForwardState(train=state.train, rng=None, masks=state.masks))
        stored = plain_bk.steps
    reference = {entry[:5]: entry[5] for entry in shadow.steps}
    # GradScaler's float32 inverse scale (a plain float64/float32 run is not scaled at all)
    inv_scale = np.float32(1.0 / np.float64(np.float32(loss_scale)))
    out = []
    for name, kind_of_layer, kind, k, t, value in stored:
        ref = reference[(name, kind_of_layer, kind, k, t)]
        values = np.asarray(plain(value))
        if kind in GRADIENT_KINDS and precision.emulated:
            with np.errstate(all="ignore"):
                values = values * inv_scale
        label = f"{name}.{kind}[l{k}, t={t}]"
        out.append(StepHealth(name, kind_of_layer, kind, k, t,
                              tensor_health(label, "step", values, ref, stored=value)))
    return out
