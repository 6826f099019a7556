"""Conformance: run every golden vector in another framework and measure its error in ulps.

``refnet conformance --framework torch [--dtype float64|float32] [--dir spec/vectors] [--json]``
rebuilds each vector's model in PyTorch (``refnet.interop.torch_twin``), loads the vector's parameters
and inputs, runs forward and backward (the loss's gradient, or Jᵀ·dy for a given upstream dy),
and compares every output and gradient element with the vector's correctly rounded reference in
that dtype: the error in ulps of the dtype at the reference value, and the vector's tolerance
(|got − ref| ≤ ulps·ulp + abs). Elements flagged ``kink`` are compared but reported apart: a
framework may follow another convention there without being wrong — unless ``strict_kinks``,
which holds them to the vector's values (torch's conventions) like every other element.

``--framework jax`` runs the same vectors in JAX (``refnet.interop.jax_twin``, CPU), float64
under a scoped ``jax.enable_x64`` and float32. Inputs and parameters are cast to the checked
dtype first (the reference is the exact gradient of the float64 inputs; a float32 run sees
them rounded once, which the tolerances of the float32 references absorb only where the
function is well conditioned — the vectors' inputs are drawn so that it is).

A tensor's report is its worst element by error/allowance (≤ 1 passes): a reference of ~0 held
to an absolute tolerance would show an absurd count of ulps (1e51), but a plain ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import numpy as np

from ..model import Model
from .vectors import records, stored_inputs

DTYPES = ("float64", "float32")


@dataclass
class TensorResult:
    name: str
    numel: int
    max_ulps: float              # the largest error in ulps of the reference (compared elements)
    worst_index: List[int]       # the element of largest error/allowance
    allowed_ulps_at_worst: float
    passed: bool
    kink_mismatches: int = 0     # kink elements outside the tolerance (compared only if strict)
    worst_ratio: float = 0.0     # error/allowance at worst_index: <= 1 passes
    worst_error: float = 0.0     # |got − ref| there
    allowed_at_worst: float = 0.0


@dataclass
class VectorResult:
    name: str
    passed: bool
    tensors: List[TensorResult] = field(default_factory=list)


def _ulp(ref: np.ndarray, dtype: str) -> np.ndarray:
    np_dtype = np.float64 if dtype == "float64" else np.float32
    return np.spacing(np.abs(ref).astype(np_dtype)).astype(np.float64)


def compare(name, got, reference: dict, dtype: str, strict_kinks: bool = False) -> TensorResult:
    """One tensor against its reference in ``dtype``: |got − ref_d| ≤ ulps·ulp_d(ref_d) + abs
    per element (the vector's tolerance). Kink elements count only if ``strict_kinks``."""
    ref = np.array([float.fromhex(h) for h in reference[dtype]]).reshape(reference["shape"])
    got = np.asarray(got, dtype=np.float64).reshape(ref.shape)
    ulp = _ulp(ref, dtype)
    tol = reference["tolerance"][dtype]
    err = np.abs(got - ref)
    allowed = tol["ulps"] * ulp + tol["abs"]
    kink = np.array(reference.get("kink", [False] * ref.size), dtype=bool).reshape(ref.shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ulps = np.where(err == 0, 0.0, err / ulp)
        ratio = np.where(err == 0, 0.0, err / allowed)
    finite = np.isfinite(got)
    ulps = np.where(np.isnan(ulps) | ~finite, np.inf, ulps)
    ratio = np.where(np.isnan(ratio) | ~finite, np.inf, ratio)
    compared = np.ones_like(kink) if strict_kinks else ~kink
    bad = ratio > 1
    # The worst element: the largest error/allowance; among ties (every error 0, say) the one
    # of largest |reference|.
    key = np.where(compared, ratio, -1.0)
    tied = np.where(key == key.max(), np.abs(ref), -1.0) if ref.size else key
    worst = np.unravel_index(int(np.argmax(tied)), ref.shape) if ref.size else ()
    with np.errstate(over="ignore", divide="ignore"):   # an all-zero reference: inf, no warning
        allowed_ulps = float(allowed[worst] / ulp[worst]) if ref.size else 0.0
    return TensorResult(name, int(ref.size),
                        float(np.max(ulps[compared])) if compared.any() else 0.0,
                        [int(i) for i in worst], allowed_ulps,
                        bool(not np.any(bad & compared)), int(np.sum(bad & kink)),
                        float(ratio[worst]) if ref.size and compared[worst] else 0.0,
                        float(err[worst]) if ref.size else 0.0,
                        float(allowed[worst]) if ref.size else 0.0)


def run_torch(record: dict, dtype: str):
    """(outputs, grads) of one vector computed by torch on the CPU, as float64 numpy arrays."""
    import torch

    from .torch_twin import torch_objective, torch_twin
    tdtype = getattr(torch, dtype)
    model = Model(record["model"])
    params, x, y, dy = stored_inputs(record)
    net = torch_twin(model, params, tdtype)
    net.train(record["mode"] == "train")
    tx = torch.tensor(x, dtype=tdtype, requires_grad=True)
    out = net(tx)
    outputs = {"output": out.detach().double().numpy()}
    if record["upstream"] == "loss":
        # the loss's options by torch's name; reduction "none": ℓ.backward(upstream)
        objective, loss = torch_objective(model, out, y)
        objective.backward()
        outputs["loss"] = loss.detach().double().numpy().reshape(-1)
    else:
        out.backward(torch.tensor(dy, dtype=tdtype))
    grads = {name: p.grad.double().numpy() for name, p in net.named_parameters()}
    grads["x"] = tx.grad.double().numpy()
    return outputs, grads


FRAMEWORKS = ("torch", "jax")


def _runner(framework: str):
    """The function that runs one vector in ``framework``: (record, dtype) -> (outputs, grads)."""
    if framework == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ValueError("conformance --framework torch needs torch "
                             "(pip install torch==2.13.0)") from None
        return run_torch
    if framework == "jax":
        try:
            import jax  # noqa: F401
        except ImportError:
            raise ValueError("conformance --framework jax needs jax "
                             "(pip install 'refnet[jax]')") from None
        from .jax_twin import run_jax
        return run_jax
    raise ValueError(f"conformance: unknown framework {framework!r}; expected one of "
                     f"{list(FRAMEWORKS)} (spec/conformance.md shows how to check any other)")


def conformance(directory="spec/vectors", framework: str = "torch",
                dtype: str = "float64", strict_kinks: bool = False) -> List[VectorResult]:
    """Every vector of ``directory`` run in ``framework`` (``"torch"``, ``"jax"``, or a function
    ``(record, dtype) -> (outputs, grads)``) and compared in ``dtype``."""
    if dtype not in DTYPES:
        raise ValueError(f"conformance: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    run = framework if callable(framework) else _runner(framework)
    results = []
    for path, record in records(directory):
        try:
            outputs, grads = run(record, dtype)
        except NotImplementedError as e:          # a layer or loss option the twin lacks
            raise ValueError(f"conformance: {path.name}: {e}") from None
        tensors = [compare(f"output/{k}", outputs[k], ref, dtype, strict_kinks)
                   for k, ref in record["outputs"].items()]
        for name, ref in record["grads"].items():
            if name not in grads:
                raise ValueError(f"conformance: {path.name}: the framework gives no gradient "
                                 f"{name!r}")
            tensors.append(compare(f"grad/{name}", grads[name], ref, dtype, strict_kinks))
        results.append(VectorResult(record["name"], all(t.passed for t in tensors), tensors))
    return results


def format_results(results: List[VectorResult], dtype: str) -> str:
    """One line per tensor: its worst element's error over its allowance (≤ 1 passes), that
    element, the error there and the allowance, and the largest error in ulps (informational:
    where the reference is ~0 and the allowance absolute, ulps say nothing)."""
    lines = [f"{'vector':<28} {'tensor':<22} {'numel':>5} {'err/allowed':>11} {'error':>9} "
             f"{'allowed':>9} {'worst':<12} {'max ulps':>9} result   ({dtype})"]
    for v in results:
        for t in v.tensors:
            note = "ok" if t.passed else "FAIL"
            if t.kink_mismatches:
                note += f" ({t.kink_mismatches} kink elements differ)"
            lines.append(f"{v.name:<28} {t.name:<22} {t.numel:>5} {t.worst_ratio:>11.3g} "
                         f"{t.worst_error:>9.2g} {t.allowed_at_worst:>9.2g} "
                         f"{str(t.worst_index):<12} {t.max_ulps:>9.3g} {note}")
    passed = sum(v.passed for v in results)
    lines.append(f"{passed} of {len(results)} vectors pass")
    return "\n".join(lines)
