"""dense on (N, *, in), as nn.Linear: the leading axes are rows, dW and db sum over all of them;
in every backend, the FD sweep, the verifier, the certificate, the fp16 emulation and torch."""

import numpy as np
import pytest
from conftest import HAVE_TORCH

from refnet import BOUND, FLOAT64, Model, MPBackend, Precision, certify, verify
from refnet.lowp.emulation import run
from refnet.verification.fdsweep import fd_sweep
from refnet.verification.triangle import LAMBDA


def sequence_spec(shape=(4, 3), seed=5, batch=2):
    """A per-time-step MLP on (N, T, F): dense 5 → tanh → dense 2, mse over every element."""
    return {"input_shape": list(shape), "seed": seed, "batch": batch, "loss": {"type": "mse"},
            "layers": [{"type": "dense", "out": 5}, {"type": "tanh"},
                       {"type": "dense", "out": 2}]}


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 3)])
def test_dense_on_leading_axes_is_dense_on_the_folded_rows_exactly(shape):
    """The sequence model's loss and every gradient equal, at 50 digits bit for bit, those of the
    same MLP on the rows folded into the batch (N·Π* samples of F features): the exact GEMMs
    and sums are the same ones, rounded once. This is the claim that dW and db sum over every
    leading axis, not only the batch."""
    nd = Model(sequence_spec(shape))
    rows = Model({**sequence_spec(shape), "input_shape": [shape[-1]],
                  "batch": 2 * int(np.prod(shape[:-1]))})
    params, x, y = nd.prepare()
    mp = MPBackend(50)
    a = nd.loss_and_grads(mp, params, x, y)
    b = rows.loss_and_grads(mp, params, x.reshape(-1, shape[-1]), y.reshape(-1, 2))
    assert a.loss == b.loss
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
    assert np.array_equal(a.x.reshape(-1, shape[-1]), b.x)


def test_the_sequence_model_passes_the_triangle_and_is_certified():
    """float64 within its bound of the 50-digit gradient (the bound backend follows the folded
    GEMM), mp FD to >= 20 digits; every interval enclosure holds the exact gradient."""
    model = Model(sequence_spec())
    report = verify(model, mode="element")
    assert report.passed, [(t.name, t.fd_digits, t.ulp_passed) for t in report.tensors]
    c = certify(model)
    assert c.certified and all(t.reference_outside == 0 for t in c.tensors)


def test_the_fd_sweep_responds_on_the_last_axis():
    """The batched FD sweep perturbs W[o, j] through its response column j of the input written
    into output o on the *last* axis (for (N, T, ·) as for (N, ·)): equal to the analytic
    gradient to central-difference accuracy, u^(2/3)·(|L| + |f'''|) ≈ 1e-10 relative, held to
    1e-7 of each tensor's largest entry (as tests/test_fdsweep.py). Writing the response into
    axis 1 instead (the time axis) is off by O(1)."""
    model = Model(sequence_spec())
    params, x, y = model.prepare()
    grads, gx = fd_sweep(model, params, x, y)
    exact = model.loss_and_grads(FLOAT64, params, x, y)
    for name, fd in list(grads.items()) + [("x", gx)]:
        ref = exact.x if name == "x" else exact.params[name]
        assert np.max(np.abs(fd - ref)) <= 1e-7 * np.max(np.abs(ref)), name


def test_the_sequence_model_runs_in_fp16_close_to_float64():
    """Under fp16 autocast every gradient is finite and within 1e-2 relative (normwise) of
    float64: the dense kernels see fp16 inputs and weights (one rounding each, u = 2⁻¹¹) and
    round their outputs once; three kernels forward and back, a handful of u ≈ 5e-3 at most."""
    model = Model(sequence_spec())
    params, x, y = model.prepare()
    ref = model.loss_and_grads(FLOAT64, params, x, y)
    r = run(model, Precision("fp16"), params, x, y)
    assert r.first_nonfinite() is None
    for name, g in ref.params.items():
        assert np.linalg.norm(r.grads[name] - g) <= 1e-2 * np.linalg.norm(g), name


def test_dense_needs_a_feature_axis():
    with pytest.raises(ValueError, match=r"input_shape|features"):
        Model({**sequence_spec(), "input_shape": []})


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_dense_on_n_t_in_matches_torch_linear():
    """nn.Linear on (N, T, in) in float64 autograd: the loss and every gradient within refnet's
    error bound (min(rigorous, 8σ)) of the exact values, as refnet's own float64 result is —
    torch folds the leading axes into one GEMM as refnet does, in another summation order."""
    import torch
    model = Model(sequence_spec((6, 4), batch=3))
    params, x, y = model.prepare()
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
                              torch.nn.Linear(5, 2)).double()
    net.load_state_dict({k: torch.tensor(v) for k, v in params.items()})
    tx = torch.tensor(x, requires_grad=True)
    loss = torch.nn.functional.mse_loss(net(tx), torch.tensor(y))
    loss.backward()
    torch_grads = {k: p.grad.numpy() for k, p in net.named_parameters()}
    torch_grads["x"] = tx.grad.numpy()
    bounds = model.loss_and_grads(BOUND, params, x, y)
    exact = model.loss_and_grads(MPBackend(50), params, x, y)
    mp = MPBackend(50)
    for name, got in torch_grads.items():
        b = bounds.x if name == "x" else bounds.params[name]
        ref = mp.to_numpy(exact.x if name == "x" else exact.params[name])
        assert np.all(np.abs(got - ref) <= np.minimum(b.e, b.probabilistic_bound(LAMBDA))), name
    loss_bound = min(float(bounds.loss.e), float(bounds.loss.probabilistic_bound(LAMBDA)))
    assert abs(loss.item() - float(mp.to_numpy(exact.loss))) <= loss_bound
