"""Assertions for other projects' test suites: hold a framework's gradients to refnet's exact
ones, element by element, within refnet's error bound for the dtype they were computed in —
not a fixed rtol.

    from refnet.testing import assert_gradients_match, assert_torch_module_gradients

    assert_torch_module_gradients(net, x, y, loss="softmax_cross_entropy")     # torch, one call
    assert_gradients_match(my_grads, model, params, x, y, dtype="float32")    # any framework

The rule, per element i of a gradient computed in dtype d (float64 or float32), is the golden
vectors' (``spec/vectors.md``) taken element by element:

    |got_i − exact_i| ≤ ULPS·ulp_d(exact_i) + λ·σ_i·u_d/u_64

exact_i: refnet's analytic gradient at 50 digits of the same inputs and parameters *cast to d*
(what the framework computed with); σ_i: the probabilistic scale of the float64 error analysis
of the same computation at that element (``refnet.numerics.errorbound``), λ = 8, scaled from
float64's unit roundoff u_64 = 2⁻⁵³ to d's; ULPS = 2, the final rounding of each side. σ_i
charges every rounding of a sum or product with the magnitude of the whole sum, so it holds for
any order of summation (another BLAS, another framework); it follows refnet's formulas
elsewhere, so a framework that computes a function another way (sigmoid′ as s(1 − s)) is
covered where that way's rounding errors are of the same size, and a float32 exp or tanh a few
ulps off leans on λ's margin. Measured: torch's float32 and float64 gradients of the networks
of tests/test_torch_import.py use at most 0.11 of their allowance.

An element whose input sits within rounding of a kink (a pre-activation ~1e-8 from relu's 0 in
float32) may legitimately take the other branch; the message says how many elements fail, so a
lone such element is recognizable.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from .interop.torch_import import _leaves, from_torch, loss_spec
from .interop.vectors import ULPS, UNIT_ROUNDOFF
from .model import Model
from .numerics.backend import MPBackend
from .numerics.errorbound import BOUND, LAMBDA

DTYPES = {"float64": np.float64, "float32": np.float32}
DPS = 50


@dataclass
class TensorMatch:
    """One gradient tensor held to the bound: its worst element and how close it came."""
    name: str
    numel: int
    failing: int                 # elements outside their allowance
    worst_index: tuple           # the element of largest error/allowance
    got: float
    exact: float
    error_ulps: float            # |got − exact| in ulps of d at the exact value
    allowed_ulps: float          # that element's allowance, in the same ulps
    ratio: float                 # error/allowance (≤ 1 passes)


def _dtype_name(dtype) -> str:
    name = getattr(dtype, "name", None) or str(dtype).replace("torch.", "")
    name = {"float": "float32", "double": "float64"}.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype must be float64 or float32, got {dtype!r}")
    return name


def allowances(model: Model, params, x, y, dtype="float64", *,
               train: Optional[bool] = None) -> Dict[str, tuple]:
    """``{name: (exact, allowed)}`` for every gradient (parameters named as in ``params``, and
    ``"x"``): refnet's exact gradient at the inputs cast to ``dtype``, rounded to float64, and
    each element's allowance ULPS·ulp_d(exact) + λσ·u_d/u_64 (the module's rule)."""
    d = _dtype_name(dtype)
    np_dtype = DTYPES[d]
    cast = lambda a: np.asarray(np.asarray(a, dtype=np.float64).astype(np_dtype),  # noqa: E731
                                dtype=np.float64)
    given = {r: k for k, r in model.refnet_keys(params).items()}
    params = {k: cast(v) for k, v in params.items()}
    x = cast(x)
    y = np.asarray(y)
    if y.dtype.kind == "f":
        y = cast(y)
    params, x, y = model.prepare(params, x, y)
    state = model.default_state(train)
    mp = MPBackend(DPS)
    exact = model.loss_and_grads(mp, params, x, y, state)
    bound = model.loss_and_grads(BOUND, params, x, y, state)
    scale = UNIT_ROUNDOFF[d] / UNIT_ROUNDOFF["float64"]
    out = {}
    for ref in list(exact.params) + ["x"]:
        e = exact.x if ref == "x" else exact.params[ref]
        b = bound.x if ref == "x" else bound.params[ref]
        want = np.asarray(mp.to_numpy(e), dtype=np.float64)
        ulp = np.spacing(np.abs(want).astype(np_dtype)).astype(np.float64)
        out[given.get(ref, model.torch_name(ref)) if ref != "x" else "x"] = (
            want, ULPS * ulp + LAMBDA * np.asarray(b.sigma) * scale)
    return out


def gradient_matches(grads: Dict[str, object], model: Model, params, x, y,
                     dtype="float64", *, train: Optional[bool] = None) -> List[TensorMatch]:
    """Every tensor of ``grads`` (parameter names as in ``params``, torch's or refnet's, and
    optionally ``"x"``) against refnet's exact gradient, element by element; see the module."""
    if not grads:
        raise ValueError("assert_gradients_match: no gradients given")
    d = _dtype_name(dtype)
    table = allowances(model, params, x, y, d, train=train)
    unknown = sorted(k for k in grads if k not in table)
    if unknown:
        raise ValueError(f"assert_gradients_match: {unknown} are not gradients of the model "
                         f"(its names: {sorted(table)})")
    results = []
    for name, got in grads.items():
        want, allowed = table[name]
        got = np.asarray(got, dtype=np.float64)
        if got.shape != want.shape:
            raise ValueError(f"assert_gradients_match: {name} has shape {got.shape}, refnet's "
                             f"gradient {want.shape}")
        ulp = np.spacing(np.abs(want).astype(DTYPES[d])).astype(np.float64)
        err = np.abs(got - want)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(err == 0, 0.0, err / allowed)
        ratio = np.where(np.isfinite(got) & ~np.isnan(ratio), ratio, np.inf)
        i = np.unravel_index(int(np.argmax(ratio)), ratio.shape) if ratio.size else ()
        # In ulps at the exact value: where that is 0 (a bias right before a batchnorm: its
        # exact gradient is 0), its ulp is the least subnormal, and the count may pass the
        # largest float — reported as inf, not raised under the caller's errstate.
        with np.errstate(over="ignore"):
            in_ulps = float(err[i] / ulp[i]), float(allowed[i] / ulp[i])
        results.append(TensorMatch(name, int(want.size), int(np.sum(ratio > 1)),
                                   tuple(int(j) for j in i), float(got[i]), float(want[i]),
                                   *in_ulps, float(ratio[i])))
    return results


def assert_gradients_match(grads: Dict[str, object], model: Model, params, x, y,
                           dtype="float64", *, train: Optional[bool] = None) -> List[TensorMatch]:
    """Fail (AssertionError) unless every element of every gradient in ``grads`` lies within
    refnet's error bound for ``dtype`` of the exact gradient (the module's rule). The message
    names each failing tensor, its worst element, that element's error in ulps and its bound.
    Returns the per-tensor results when it passes. ``params`` and ``x`` are cast to ``dtype``
    first: pass the values your framework computed with; ``train`` overrides the model's mode.
    """
    __tracebackhide__ = True                              # pytest: show the caller's line
    d = _dtype_name(dtype)
    results = gradient_matches(grads, model, params, x, y, d, train=train)
    failing = [r for r in results if r.failing]
    if failing:
        lines = [f"{len(failing)} of {len(results)} gradient tensors are outside refnet's "
                 f"{d} error bound (2 ulps + {LAMBDA:g}σ of the error analysis, per element):"]
        for r in failing:
            lines.append(f"  {r.name}: {r.failing} of {r.numel} elements; worst {r.worst_index}: "
                         f"got {r.got!r}, exact {r.exact!r}, error {r.error_ulps:.3g} ulps > "
                         f"bound {r.allowed_ulps:.3g} ulps")
        raise AssertionError("\n".join(lines))
    return results


def torch_gradients(module, x, y, loss, model: Model):
    """``module``'s own autograd gradients (a copy of it, so its buffers are not touched), in its
    dtype: ``{name: array}`` with the input's under ``"x"``."""
    import torch

    from .interop.torch_twin import torch_loss
    net = copy.deepcopy(module)
    dtype = next(iter(p.dtype for p in net.parameters()), torch.float64)
    tx = torch.as_tensor(x).to(dtype).clone().requires_grad_(True)
    out = net(tx)
    target = torch.as_tensor(y)
    target = target.long() if model.loss.type == "softmax_cross_entropy" else target.to(dtype)
    options = {} if model.loss.reduction == "mean" else {"reduction": model.loss.reduction}
    torch_loss(model)(out, target, **options).backward()
    grads = {k: p.grad.detach().double().numpy() for k, p in net.named_parameters()
             if p.grad is not None}
    grads["x"] = tx.grad.detach().double().numpy()
    return grads, dtype


def assert_torch_module_gradients(module, x, y, loss, *, check_forward: bool = True):
    """The torch round trip in one call: import ``module`` (``refnet.from_torch``), compute its
    autograd gradients of ``loss`` at (x, y) in its own dtype (float64 or float32) on a copy,
    and ``assert_gradients_match`` them. Train-mode dropout with p > 0 is refused: torch and
    refnet would draw different masks."""
    __tracebackhide__ = True
    import torch
    model, params = from_torch(module, x, loss_spec(loss), check=check_forward)
    if model.mode == "train" and any(layer.type in ("dropout", "dropout2d") and
                                     layer.config["p"] > 0 for layer in _leaves(model)):
        raise ValueError("assert_torch_module_gradients: dropout in train mode draws torch's own "
                         "masks; call module.eval() or set p = 0")
    grads, dtype = torch_gradients(module, x, y, loss, model)
    x64 = torch.as_tensor(x).detach().double().numpy()
    y_np = torch.as_tensor(y).detach().numpy()
    return assert_gradients_match(grads, model, params, x64, y_np, _dtype_name(dtype))
