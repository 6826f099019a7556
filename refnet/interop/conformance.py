"""Conformance: run every golden vector in another framework and measure its error in ulps.

``refnet conformance --framework torch [--dtype float64|float32] [--dir spec/vectors] [--json]``
rebuilds each vector's model in PyTorch (``refnet.interop.torch_twin``), loads the vector's parameters
and inputs, runs forward and backward (the loss's gradient, or Jᵀ·dy for a given upstream dy),
and compares every output and gradient element with the vector's correctly rounded reference in
that dtype: the error in ulps of the dtype at the reference value, and the vector's tolerance
(|got − ref| ≤ ulps·ulp + abs). Elements flagged ``kink`` are compared but reported apart: a
framework may follow another convention there without being wrong.
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
    max_ulps: float
    worst_index: List[int]
    allowed_ulps_at_worst: float
    passed: bool
    kink_mismatches: int = 0


@dataclass
class VectorResult:
    name: str
    passed: bool
    tensors: List[TensorResult] = field(default_factory=list)


def _ulp(ref: np.ndarray, dtype: str) -> np.ndarray:
    np_dtype = np.float64 if dtype == "float64" else np.float32
    return np.spacing(np.abs(ref).astype(np_dtype)).astype(np.float64)


def compare(name, got, reference: dict, dtype: str) -> TensorResult:
    ref = np.array([float.fromhex(h) for h in reference[dtype]]).reshape(reference["shape"])
    got = np.asarray(got, dtype=np.float64).reshape(ref.shape)
    ulp = _ulp(ref, dtype)
    tol = reference["tolerance"][dtype]
    err = np.abs(got - ref)
    allowed = tol["ulps"] * ulp + tol["abs"]
    kink = np.array(reference.get("kink", [False] * ref.size), dtype=bool).reshape(ref.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        ulps = np.where(err == 0, 0.0, err / ulp)
    ulps = np.where(np.isnan(ulps), np.inf, ulps)
    smooth = ~kink
    bad = (err > allowed) | ~np.isfinite(got)
    # The worst element; among ties (every error 0, say) the one of largest |reference|, whose
    # allowed ulps are finite (an exact 0 with an absolute tolerance allows abs/2⁻¹⁰⁷⁴ of them).
    key = np.where(smooth, ulps, -1.0)
    tied = np.where(key == key.max(), np.abs(ref), -1.0) if ref.size else key
    worst = np.unravel_index(int(np.argmax(tied)), ref.shape) if ref.size else ()
    with np.errstate(over="ignore"):           # all-zero references: inf, not a warning
        allowed_ulps = float(allowed[worst] / ulp[worst]) if ref.size else 0.0
    return TensorResult(name, int(ref.size), float(np.max(ulps[smooth])) if smooth.any() else 0.0,
                        [int(i) for i in worst], allowed_ulps,
                        bool(not np.any(bad & smooth)), int(np.sum(bad & kink)))


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


def conformance(directory="spec/vectors", framework: str = "torch",
                dtype: str = "float64") -> List[VectorResult]:
    if framework != "torch":
        raise ValueError(f"conformance: unknown framework {framework!r}; expected 'torch' "
                         f"(spec/conformance.md shows how to check any other)")
    if dtype not in DTYPES:
        raise ValueError(f"conformance: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ValueError("conformance --framework torch needs torch "
                         "(pip install torch==2.13.0)") from None
    results = []
    for path, record in records(directory):
        outputs, grads = run_torch(record, dtype)
        tensors = [compare(f"output/{k}", outputs[k], ref, dtype)
                   for k, ref in record["outputs"].items()]
        for name, ref in record["grads"].items():
            if name not in grads:
                raise ValueError(f"conformance: {path.name}: torch has no gradient {name!r}")
            tensors.append(compare(f"grad/{name}", grads[name], ref, dtype))
        results.append(VectorResult(record["name"], all(t.passed for t in tensors), tensors))
    return results


def format_results(results: List[VectorResult], dtype: str) -> str:
    lines = [f"{'vector':<28} {'tensor':<22} {'numel':>5} {'max ulps':>10} {'allowed':>10} "
             f"{'worst':<12} result   ({dtype})"]
    for v in results:
        for t in v.tensors:
            note = "ok" if t.passed else "FAIL"
            if t.kink_mismatches:
                note += f" ({t.kink_mismatches} kink elements differ)"
            lines.append(f"{v.name:<28} {t.name:<22} {t.numel:>5} {t.max_ulps:>10.3g} "
                         f"{t.allowed_ulps_at_worst:>10.3g} {str(t.worst_index):<12} {note}")
    passed = sum(v.passed for v in results)
    lines.append(f"{passed} of {len(results)} vectors pass")
    return "\n".join(lines)
