"""A GPU run's gradients, captured for ``refnet diagnose --compare`` (``refnet capture``).

Runs a refnet model in torch — on a CUDA device, where the comparison means something — under
the same precision policy, loss scale and loss dtype the emulation is given, from the very
values the emulation starts from, and returns every gradient unscaled under the model's torch
names (and ``x``, the input gradient), as float32 arrays:

- parameters and input as the policy holds them, rounded once from float64 in numpy
  (``refnet.numerics.formats.round_to``): float32 master weights and a float32 input under
  ``autocast``; the storage format under ``half`` (torch's own float64 → half cast rounds
  twice, through float32, and lands on the farther neighbour for a few elements per tensor);
- ``autocast``: the forward and the loss inside ``torch.autocast(device, dtype)``; ``half``:
  ``net.to(dtype)`` (BatchNorm's running statistics too, as ``model.half()``); with
  ``loss_dtype="float32"`` the loss is ``loss_fn(output.float(), y)``;
- float targets as the policy holds the input: rounded once to the storage format under
  ``half`` (with the policy's loss), float32 otherwise;
- ``(loss * S).backward()``, then each gradient ``g.float() * inv_scale`` with
  ``inv_scale = float32(1 / float64(float32(S)))``: GradScaler.unscale_'s arithmetic, which is
  the stored gradient divided by S exactly when S is a power of two;
- cuDNN deterministic, TF32 off (the H100 runs' settings, ``shared/PRECISION.md``); with
  ``reduced_precision_reduction=False`` also cuBLAS's fp16/bf16 reduced-precision reductions.

Refused (ValueError): dropout in train mode (a GPU run draws its own masks, so no value could
be compared) and L1/L2 regularization (the emulation does not model it). Needs torch
(imported here, not by refnet).
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from ..losses import Targets, split_targets
from ..model import Model
from ..numerics.formats import round_to
from .torch_twin import torch_objective, torch_twin

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
POLICIES = ("autocast", "half")
LOSS_DTYPES = ("policy", "float32")


def _dropout_layers(layers):
    for layer in layers:
        if layer.type in ("dropout", "dropout2d") and float(layer.config["p"]) > 0:
            yield layer
        for child in ("body", "shortcut"):
            seq = getattr(layer, child, None)
            if seq is not None:
                yield from _dropout_layers(seq.layers)


def check_capturable(model: Model, train: bool) -> None:
    """The refusals of the module docstring, as one-line errors naming the layer."""
    if train:
        for layer in _dropout_layers(model.layers):
            raise ValueError(f"{layer.where}: dropout in train mode draws the GPU's own masks, "
                             f"so its gradients cannot be compared value for value; capture "
                             f"with --eval or a model without dropout")
    if model.l1 or model.l2:
        raise ValueError("the fp16/bf16 emulation does not model the L1/L2 penalty terms; "
                         "capture the model without 'regularization'")


def capture_gradients(model: Model, params, x, y, precision: str = "fp16",
                      policy: str = "autocast", loss_scale: float = 1.0,
                      loss_dtype: str = "policy", device: str = "cuda", train: bool = True,
                      reduced_precision_reduction: bool = True) -> Dict[str, np.ndarray]:
    """{torch name: unscaled gradient (float32)} and ``"x"`` for ``params``, ``x``, ``y`` as
    ``Model.prepare`` returns them (the module docstring says how)."""
    if precision not in TORCH_DTYPES:
        raise ValueError(f"capture: precision must be one of {sorted(TORCH_DTYPES)}, got "
                         f"{precision!r}")
    if policy not in POLICIES or loss_dtype not in LOSS_DTYPES:
        raise ValueError(f"capture: policy must be one of {list(POLICIES)} and loss_dtype one "
                         f"of {list(LOSS_DTYPES)}, got {policy!r}, {loss_dtype!r}")
    check_capturable(model, train)
    params = model.refnet_named(params)         # the twin loads refnet's names
    dtype = TORCH_DTYPES[precision]
    dev = torch.device(device)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced_precision_reduction

    def held(a):
        """float64 → the policy's format, rounded once; as float32 (exact for fp16/bf16)."""
        a = np.asarray(a, dtype=np.float64)
        if policy == "half":
            a = round_to(a, precision)
        return torch.tensor(a.astype(np.float32))

    net = torch_twin(model, {k: held(v).numpy() if not k.endswith("num_batches_tracked")
                             else np.asarray(v) for k, v in params.items()},
                     dtype=torch.float32)
    net = net.to(dev)
    if policy == "half":
        net = net.to(dtype)                 # exact: every value is already in the format
    net.train(train)
    xt = held(x).to(dev)
    if policy == "half":
        xt = xt.to(dtype)
    xt.requires_grad_(True)

    # Float targets (and a reduction-"none" upstream vector) as the policy holds the input:
    # the storage format under half (``y.half()``, rounded once here), float32 under autocast
    # or with a float32 loss — what the emulation reads them as (spec/precision.md).
    y_held, target_dtype = y, torch.float32
    if policy == "half" and loss_dtype == "policy":
        target_dtype = dtype
        target, upstream = split_targets(y)
        if np.asarray(target).dtype.kind == "f":
            target = round_to(np.asarray(target, dtype=np.float64), precision)
        y_held = target if upstream is None else Targets(
            target, round_to(np.asarray(upstream, dtype=np.float64), precision))

    def loss_of(out):
        out = out.float() if loss_dtype == "float32" else out
        return torch_objective(model, out, y_held, target_dtype=target_dtype)[0]

    if policy == "autocast":
        with torch.autocast(device_type=dev.type, dtype=dtype):
            loss = loss_of(net(xt))
    else:
        loss = loss_of(net(xt))
    scale = np.float32(loss_scale)
    (loss * float(scale)).backward()
    inv_scale = torch.tensor(np.float32(1.0 / np.float64(scale)), device=dev)
    grads = {}
    for name, p in net.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        grads[model.torch_name(name)] = (g.float() * inv_scale).cpu().numpy()
    grads["x"] = (xt.grad.float() * inv_scale).cpu().numpy()
    return grads
