"""Recurrent layers (issue 16): rnn, lstm and gru are torch's nn.RNN, nn.LSTM and nn.GRU
(batch first), their backpropagation through time is proven right three ways like every other
layer's, they run in every backend, and the fp16/bf16 emulation stores every step as cuDNN does.

The unseen specs (``UNSEEN``) are the acceptance list of the issue: tanh and relu RNNs, 1- and
2-layer LSTMs and GRUs, bias on and off, "sequence" and "last" outputs, an LSTM feeding a GRU,
and a 40-step vanishing tanh RNN; none of them is a golden vector or an example."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import HAVE_TORCH, reference_rounding

from refnet import BOUND, FLOAT32, FLOAT64, ExpansionBackend, Model, MPBackend, Precision, certify, verify
from refnet.cli import main
from refnet.layers import recurrent
from refnet.lowp.emulation import format_of, plain, round_float32, run
from refnet.lowp.steps import StepRecorder, step_health
from refnet.numerics.errorbound import LAMBDA

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
RECURRENT_VECTORS = ("rnn", "rnn-relu-last", "lstm", "gru", "net-lstm-gru")
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")


def seq_spec(layers, T=6, F=3, batch=3, seed=0, loss="mse"):
    return {"input_shape": [T, F], "seed": seed, "batch": batch, "layers": layers,
            "loss": {"type": loss}}


UNSEEN = {
    "rnn-tanh": seq_spec([{"type": "rnn", "hidden_size": 5}, {"type": "dense", "out": 2}],
                         seed=1),
    "rnn-relu-2-last": seq_spec([{"type": "rnn", "hidden_size": 5, "nonlinearity": "relu",
                                  "num_layers": 2, "output": "last"}], seed=2),
    "lstm-nobias": seq_spec([{"type": "lstm", "hidden_size": 4, "bias": False}], seed=3),
    "lstm-2-last-forget": seq_spec([{"type": "lstm", "hidden_size": 4, "num_layers": 2,
                                     "output": "last", "forget_bias": 1.0}], seed=4),
    "gru-last": seq_spec([{"type": "gru", "hidden_size": 4, "output": "last"}], seed=5),
    "gru-2-nobias": seq_spec([{"type": "gru", "hidden_size": 4, "num_layers": 2,
                              "bias": False}], seed=6),
    "lstm-into-gru": seq_spec([{"type": "lstm", "hidden_size": 5},
                               {"type": "gru", "hidden_size": 3, "output": "last"},
                               {"type": "dense", "out": 2}], seed=7),
    "rnn-vanishing-40": seq_spec([{"type": "rnn", "hidden_size": 16, "output": "last"},
                                  {"type": "dense", "out": 2}], T=40, batch=4, seed=8),
}


def normwise(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def torch_gradients(model, params, x, y):
    """torch's float64 autograd of the twin (nn.RNN/LSTM/GRU): {name: grad, "x": dL/dx}."""
    import torch

    from refnet.interop.torch_twin import torch_objective, torch_twin
    net = torch_twin(model, params, torch.float64)
    tx = torch.tensor(x, requires_grad=True)
    objective, _ = torch_objective(model, net(tx), y)
    objective.backward()
    grads = {k: p.grad.numpy() for k, p in net.named_parameters()}
    grads["x"] = tx.grad.numpy()
    return grads


def refnet_gradients(model, params, x, y, bk=FLOAT64):
    g = model.loss_and_grads(bk, params, x, y)
    return {**g.params, "x": g.x}


def torch_agreement(model, params, x, y):
    """(max normwise distance refnet–torch over the tensors, max normwise error bound B of
    refnet's float64 gradients: ‖min(e, 8σ)‖/‖g‖, the verifier's per-element bound)."""
    ours, theirs = refnet_gradients(model, params, x, y), torch_gradients(model, params, x, y)
    assert set(ours) == set(theirs), "the twin's parameter names are refnet's"
    bound = refnet_gradients(model, params, x, y, BOUND)
    distance = max(normwise(ours[k], theirs[k]) for k in theirs)
    b = max(float(np.linalg.norm(np.minimum(bound[k].e, bound[k].probabilistic_bound(LAMBDA)))
                  / np.linalg.norm(theirs[k])) for k in theirs)
    return distance, b


# --- torch agreement ------------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("name", UNSEEN)
def test_float64_gradients_equal_torch_autograd_within_twice_their_error_bound_and_1e_11(name):
    """Every parameter's gradient and dL/dx equal torch's float64 autograd normwise within
    1e-11, and within 2B. Why: refnet's float64 gradient lies within its running error bound B
    (min(rigorous, 8σ), errorbound.py, carried through every step of the T-step recurrence:
    per step one GEMM of length F or H, the gates, the products with W_hhᵀ) of the exact one;
    torch computes the same formulas in float64 summed in another order, so its error has the
    same bound and the two differ by at most 2B. Measured on these specs: B ≤ 3.6e-14 normwise
    (the 40-step RNN's is the largest), the distance ≤ 0.03·2B (≤ 6.1e-16); so 1e-11, the
    issue's bound, is implied with a factor 140 to spare, and 2B is the sharper claim."""
    model = Model(UNSEEN[name])
    params, x, y = model.prepare()
    distance, b = torch_agreement(model, params, x, y)
    assert 2 * b < 1e-11, f"the error analysis ({2 * b:.2g}) no longer implies 1e-11"
    assert distance <= 2 * b, f"{name}: refnet–torch {distance:.3g} > 2B = {2 * b:.3g}"


@needs_torch
@pytest.mark.parametrize("spec, shape", [
    (UNSEEN["rnn-tanh"]["layers"][:1], (3, 6, 5)),
    (UNSEEN["gru-last"]["layers"], (3, 4)),
])
def test_the_outputs_are_torchs_output_and_its_last_step(spec, shape):
    """"sequence" is torch's output (N, T, H), "last" its output[:, -1] (N, H), equal to the
    twin's in float64 within twice refnet's error bound of the output plus 2 ulps (torch's
    error has the same bound; the import's check uses the same rule)."""
    import_torch = pytest.importorskip("torch")
    from refnet.interop.torch_twin import torch_twin
    model = Model(seq_spec(spec))
    params, x, y = model.prepare()
    out = np.asarray(model.forward(FLOAT64, params, x, y).output)
    theirs = torch_twin(model, params)(import_torch.tensor(x)).detach().numpy()
    assert out.shape == theirs.shape == shape
    bound = model.forward(BOUND, params, x, y).output
    allowed = 2 * np.minimum(bound.e, bound.probabilistic_bound(LAMBDA)) + 2 * np.spacing(abs(out))
    assert np.all(np.abs(out - theirs) <= allowed)


# --- the verification triangle --------------------------------------------------------------

@pytest.mark.parametrize("name", UNSEEN)
def test_verify_passes_on_every_unseen_recurrent_spec_with_at_least_20_fd_digits(name):
    """Every float64 gradient within its error bound of the 50-digit one, and the 50-digit
    analytic gradient equal to high-precision central differences of the forward pass (no
    backward code) to ≥ 20 digits (measured: ≥ 30.2 on every spec)."""
    report = verify(Model(UNSEEN[name]), jobs=1)
    assert report.passed, [(t.name, t.ulp_passed, t.fd_digits) for t in report.tensors]
    assert min(t.fd_digits for t in report.tensors) >= 20
    assert not report.kinks


def test_verify_with_the_expansion_engine_passes_on_an_lstm_feeding_a_gru():
    """The recurrent layers run in the expansion engine too (float64 expansions, Ozaki GEMMs):
    `verify --engine expansion` passes and names that engine."""
    report = verify(Model(UNSEEN["lstm-into-gru"]), engine="expansion", jobs=1)
    assert report.passed and report.engine.startswith("float64 expansions")


def _plant_on_the_cell_path(monkeypatch, factor):
    """δc_{t−1} = δc_t ⊙ f ⊙ (1 + factor) in every backend: a wrong BPTT formula."""
    original = recurrent.LSTM.cell_backward

    def planted(self, bk, d_carry, keep, w_hh, k, t):
        (dh, dc), du, dv = original(self, bk, d_carry, keep, w_hh, k, t)
        return (dh, dc + dc * bk.const(factor)), du, dv
    monkeypatch.setattr(recurrent.LSTM, "cell_backward", planted)


@pytest.mark.parametrize("factor, passes", [("1e-19", False), ("1e-22", True)])
def test_an_error_on_the_lstm_cell_path_just_above_the_fd_threshold_fails_verify(
        monkeypatch, factor, passes):
    """The FD leg holds the backward's formula to 20 digits: the cell-path carry δc ⊙ f made
    larger by a relative 1e-19 (one digit above the threshold: measured 18.8–19.7 digits, the
    error grows over the steps) fails verify; by 1e-22 (21.8 digits) it passes. The float64
    ulp leg cannot see either (the error is below float64's rounding)."""
    _plant_on_the_cell_path(monkeypatch, factor)
    report = verify(Model(UNSEEN["lstm-2-last-forget"]), jobs=1)
    assert report.passed is passes
    assert all(t.ulp_passed for t in report.tensors)


@needs_torch
def test_an_error_on_the_cell_path_below_1e_11_fails_the_error_bound_agreement(monkeypatch):
    """A relative 2⁻⁴⁰ on the cell-path carry moves the gradients by 2.3e-12 from torch's:
    inside the issue's 1e-11, but 60× outside 2B — the analysis-based bound has teeth the
    fixed one lacks — and verify fails it too (12 digits)."""
    _plant_on_the_cell_path(monkeypatch, 2.0 ** -40)
    model = Model(UNSEEN["lstm-2-last-forget"])
    params, x, y = model.prepare()
    distance, b = torch_agreement(model, params, x, y)
    assert distance < 1e-11 and distance > 2 * b
    assert not verify(model, jobs=1).passed


def _transposed_w_hh(self, bk, d_carry, a, w_hh, k, t):
    (dh,) = d_carry
    da = dh * self.activation.df(bk, a, None)
    return (bk.matmul(da, w_hh.T),), da, da           # the bug: W_hh instead of W_hhᵀ


def _no_forget_factor(self, bk, d_carry, keep, w_hh, k, t):
    (dh, dc_next) = d_carry
    zi, zf, zg, zo, ei, ef, eo, i, f, g, o, c_prev, c, tanh_c = keep
    sig, tanh = recurrent._SIGMOID, recurrent._TANH
    dc = dc_next + dh * o * tanh.df(bk, c, None)
    dz = recurrent.concat(bk, [(dc * g) * sig.df(bk, zi, ei), (dc * c_prev) * sig.df(bk, zf, ef),
                               (dc * i) * tanh.df(bk, zg, None),
                               (dh * tanh_c) * sig.df(bk, zo, eo)], axis=1)
    return (bk.matmul(dz, w_hh), dc), dz, dz           # the bug: δc_{t−1} = δc_t, no ⊙ f


@pytest.mark.parametrize("cls, method, planted, name", [
    (recurrent.RNN, "cell_backward", _transposed_w_hh, "rnn-tanh"),
    (recurrent.LSTM, "cell_backward", _no_forget_factor, "lstm-nobias"),
])
def test_a_planted_bptt_bug_fails_verify_and_the_torch_agreement(monkeypatch, cls, method,
                                                                 planted, name):
    """W_hh in place of W_hhᵀ in the RNN's δh_{t−1}, and the LSTM's cell path without its
    forget gate (δc_{t−1} = δc_t): verify's FD leg fails (the forward is untouched), and so
    does the agreement with torch."""
    monkeypatch.setattr(cls, method, planted)
    model = Model(UNSEEN[name])
    report = verify(model, jobs=1)
    assert not report.passed
    assert min(t.fd_digits for t in report.tensors) < 5
    if HAVE_TORCH:
        params, x, y = model.prepare()
        assert torch_agreement(model, params, x, y)[0] > 1e-3


def test_the_lstm_cell_path_derivative_is_the_product_of_the_forget_gates_bit_for_bit():
    """∂c_T/∂c_t = Π_{k=t+1..T} f_k along the cell path. With W_hh = 0 the cell path is the
    only one from c_t to the output (the gates no longer see h), and the total ∂L/∂c_t the
    backward hands to each step (recorded by StepRecorder) equals ∂L/∂c_{T−1} multiplied by
    the forward's f_{T−1}, …, f_{t+1} in that order — bit for bit in float64: the other terms
    are exact zeros."""
    spec = seq_spec([{"type": "lstm", "hidden_size": 4, "output": "last"}], T=12, seed=9)
    model = Model(spec)
    params, x, y = model.prepare()
    params["0.weight_hh_l0"] = np.zeros_like(params["0.weight_hh_l0"])
    recorder = StepRecorder()
    g = model.loss_and_grads(recorder, params, x, y)
    dc = {t: v for _, _, kind, _, t, v in recorder.steps if kind == "dc"}
    forget = [keep[8] for keep in g.forward.caches[0][0][2]]          # f_t of every step
    expected = dc[11]
    for t in reversed(range(11)):
        expected = expected * forget[t + 1]
        assert np.array_equal(dc[t], expected), t
    assert 0 < np.min(np.abs(dc[0] / dc[11])) and np.max(np.abs(dc[0] / dc[11])) < 1


@pytest.mark.parametrize("name", ["rnn-relu-2-last", "lstm-into-gru"])
def test_the_float64_fd_sweep_agrees_with_bptt_to_fd_accuracy(name):
    """The batched float64 central differences (the weak witness, no backward code) of every
    parameter and input element: central differences with h = u^(1/3) err by
    ~u^(2/3)·(|L| + |f‴|), 2e-9 of each tensor's largest entry here (measured), held to 1e-7
    as test_fdsweep holds the CNN's."""
    from refnet.verification.fdsweep import fd_sweep
    model = Model(UNSEEN[name])
    params, x, y = model.prepare()
    grads, gx = fd_sweep(model, params, x, y)
    exact = refnet_gradients(model, params, x, y)
    for k, fd in list(grads.items()) + [("x", gx)]:
        assert np.max(np.abs(fd - exact[k])) <= 1e-7 * np.max(np.abs(exact[k])), k


# --- kinks ----------------------------------------------------------------------------------

def test_the_relu_rnn_reports_kinks_where_a_preactivation_is_exactly_zero():
    """A relu RNN without bias on an input whose first step is 0 has a_0 = 0 exactly in every
    unit: its kink signature (a_t > 0 for every layer and step) makes verify report the finite
    differences that cross it as kinks instead of comparing them (those of x_0: the weights'
    perturbations keep a_0 = ΔW·0 = 0 on the kink), and certify names the layer as not
    certifiable."""
    spec = seq_spec([{"type": "rnn", "hidden_size": 3, "nonlinearity": "relu", "bias": False,
                      "num_layers": 2}], T=4, F=2, batch=2, seed=10)
    model = Model(spec)
    params, x, y = model.prepare()
    fwd = model.forward(FLOAT64, params, x, y)
    assert len(model.layers[0].kink_signature(fwd.caches[0])) == 2 * 4     # layers × steps
    x[:, 0, :] = 0.0
    report = verify(model, params, x, y, jobs=1)
    x_report = next(t for t in report.tensors if t.name == "x")
    assert report.passed and x_report.fd_kinks > 0
    assert all(k.startswith("FD step crosses a kink at layers[0]") for k in x_report.kinks)
    cert = certify(model, params, x, y)
    assert not cert.certified and not cert.failed and "layer 0 (rnn)" in cert.straddles


# --- every backend --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rnn-relu-2-last", "lstm-2-last-forget", "lstm-into-gru"])
def test_every_backend_runs_the_recurrent_layers(name):
    """The same layer code: the bound backend's values are float64's bit for bit; the 50-digit
    gradients rounded to float64 lie within that bound of float64's; float32's lie within the
    same analysis at float32's unit roundoff (the bound ×2²⁹ = u₃₂/u₆₄, computed on the
    float32-rounded inputs so that only arithmetic enters) of float64 on those inputs;
    intervals enclose the 50-digit gradients (certified, no kink)."""
    model = Model(UNSEEN[name])
    params, x, y = model.prepare()
    g64 = refnet_gradients(model, params, x, y)
    gb = refnet_gradients(model, params, x, y, BOUND)
    mp = MPBackend(50)
    gm = refnet_gradients(model, params, x, y, mp)
    for k in g64:
        assert np.array_equal(gb[k].v, g64[k])
        bound = np.minimum(gb[k].e, gb[k].probabilistic_bound(LAMBDA))
        assert np.all(np.abs(g64[k] - mp.to_numpy(gm[k]))
                      <= bound + reference_rounding(mp.to_numpy(gm[k]))), k
    p32 = {k: np.float64(np.float32(v)) for k, v in params.items()}
    x32 = np.float64(np.float32(x))
    g32 = refnet_gradients(model, p32, x32, y, FLOAT32)
    on32 = refnet_gradients(model, p32, x32, y)
    b32 = refnet_gradients(model, p32, x32, y, BOUND)
    for k in g32:
        assert g32[k].dtype == np.float32
        scaled = 2.0 ** 29 * np.minimum(b32[k].e, b32[k].probabilistic_bound(LAMBDA))
        assert np.all(np.abs(np.float64(g32[k]) - on32[k]) <= scaled), k
    cert = certify(model, params, x, y)
    assert cert.certified, cert.status


def test_the_expansion_backend_gives_the_mp_gradients():
    """ExpansionBackend at 50 digits and MPBackend at 60 agree to 45 digits on an LSTM feeding a
    GRU (the engine is within 2^(1−prec) per operation of exact; the gradients are well
    conditioned here)."""
    model = Model(UNSEEN["lstm-into-gru"])
    params, x, y = model.prepare()
    eb, mp = ExpansionBackend(50), MPBackend(60)
    ge = model.loss_and_grads(eb, params, x, y)
    gm = model.loss_and_grads(mp, params, x, y)
    for k in gm.params:
        pairs = zip(np.ravel(eb.to_mpf(ge.params[k])), np.ravel(gm.params[k]))
        rel = max(abs(mp.ctx.mpf(a) - b) / abs(b) for a, b in pairs if b)
        assert rel < mp.ctx.mpf("1e-45"), k


# --- golden vectors -------------------------------------------------------------------------

def test_the_recurrent_vectors_recompute_without_drift(tmp_path):
    """The five recurrent vectors (rnn, rnn-relu-last, lstm, gru, net-lstm-gru) are what the
    generator computes now, field by field."""
    from refnet.interop.vectors import check
    for name in RECURRENT_VECTORS:
        shutil.copy(VECTORS / f"{name}.json", tmp_path)
    assert check(tmp_path) == []


@needs_torch
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_conforms_to_the_recurrent_vectors(tmp_path, capsys, dtype):
    """`refnet conformance --framework torch` passes the recurrent vectors in float64 and
    float32, strict kinks (measured: the worst tensor at 0.11 of its allowance)."""
    for name in RECURRENT_VECTORS:
        shutil.copy(VECTORS / f"{name}.json", tmp_path)
    code = main(["conformance", "--framework", "torch", "--dtype", dtype, "--dir",
                 str(tmp_path), "--strict-kinks", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and len(report["vectors"]) == 5
    assert max(t["worst_ratio"] for v in report["vectors"] for t in v["tensors"]) < 0.5


# --- the fp16/bf16 emulation ----------------------------------------------------------------

def test_autocast_runs_the_recurrent_kernel_in_fp16_even_with_bf16_storage():
    """torch's autocast casts cuDNN's RNN to fp16 whatever its dtype (AutocastRNN.cpp): under
    bf16 autocast the GRU's output, its parameter gradients and every stored step are fp16 and
    the dense after it is bf16; under bf16 half everything is bf16."""
    model = Model(UNSEEN["lstm-into-gru"])
    params, x, y = model.prepare()
    r = run(model, Precision("bf16"), params, x, y)
    assert [format_of(out) for _, _, out in r.outputs] == ["fp16", "fp16", "bf16"]
    assert {format_of(g) for k, g in r.scaled_grads.items() if k[0] in "01"} == {"fp16"}
    assert {format_of(g) for k, g in r.scaled_grads.items() if k[0] == "2"} == {"bf16"}
    assert {format_of(v) for *_, v in r.trace.steps} == {"fp16"}
    half = run(model, Precision("bf16", "half"), params, x, y)
    assert {format_of(out) for _, _, out in half.outputs} == {"bf16"}
    assert {format_of(v) for *_, v in half.trace.steps} == {"bf16"}


def test_each_emulated_lstm_step_is_the_float32_cell_of_the_stored_state_rounded_once():
    """The kernel model: step t reads the stored h_{t−1}, c_{t−1} (fp16) and fp16 weights,
    computes the cell in float32, and stores c_t, h_t rounded once to fp16 — so one float32
    cell step from the stored values, rounded, gives the stored next values bit for bit; and
    every stored value is an fp16 number."""
    model = Model(UNSEEN["lstm-nobias"])
    params, x, y = model.prepare()
    r = run(model, Precision("fp16"), params, x, y)
    layer = model.layers[0]
    h = {t: v for _, _, kind, _, t, v in r.trace.steps if kind == "h"}
    c = {t: v for _, _, kind, _, t, v in r.trace.steps if kind == "c"}
    w_ih, w_hh = (np.asarray(plain(round_float32(np.float32(params[f"0.{n}"]), "fp16")))
                  for n in ("weight_ih_l0", "weight_hh_l0"))
    x16 = round_float32(np.float32(x), "fp16")
    u = FLOAT32.matmul(np.asarray(x16), w_ih.T)
    for t in range(1, 6):
        carry = (np.asarray(plain(h[t - 1])), np.asarray(plain(c[t - 1])))
        (h_new, c_new), _ = layer.cell(FLOAT32, u[:, t], carry, w_hh, None, 0, t)
        assert np.array_equal(round_float32(c_new, "fp16"), plain(c[t])), t
        # h_t = o ⊙ tanh(c_t) is formed from the *stored* c_t
        o = recurrent._SIGMOID.f(FLOAT32, (u[:, t] + FLOAT32.matmul(carry[0], w_hh.T))[:, 12:])[0]
        assert np.array_equal(round_float32(o * np.tanh(np.asarray(plain(c[t]))), "fp16"),
                              plain(h[t])), t
    for *_, v in r.trace.steps:
        assert np.array_equal(round_float32(plain(v), "fp16"), plain(v))


def test_fp16_per_step_accounting_finds_the_early_steps_gradients_zero():
    """step_health on the 40-step vanishing tanh RNN (autocast fp16, no loss scaling): ∂L/∂h_t
    shrinks from 0.12 (t = 36) to 1.4e-12 (t = 0) in float64; every step whose float64 values
    all lie below 2⁻²⁵ (below half fp16's smallest subnormal, so they round to 0) is entirely
    zero in fp16 (t ≤ 15 here, spec/precision.md), and no element of float64 magnitude ≥ 2⁻²³
    (four subnormal steps) underflows. The float64 policy records the same steps with nothing
    lost."""
    model = Model(UNSEEN["rnn-vanishing-40"])
    rows = [r for r in step_health(model, Precision("fp16")) if r.kind == "dh"]
    assert [r.t for r in rows] == list(reversed(range(40)))
    dead = [r.t for r in rows if r.health.underflow == r.health.numel]
    # The dead steps are the earliest ones (t ≤ 15 on this machine). Which step is the last
    # dead one is not asserted: at t = 16, 62 of 64 elements underflow, and a BLAS summing in
    # another order may move that step; the rule below (values under 2⁻²⁵ must vanish) is.
    assert len(dead) >= 10 and sorted(dead) == list(range(len(dead)))
    for r in rows:
        assert r.health.norm_float64 > 0
        if r.health.max_abs_float64 < 2.0 ** -25:
            assert r.health.underflow == r.health.numel, r.t
    assert min(r.health.norm_float64 for r in rows) == pytest.approx(1.374e-12, rel=1e-3)
    # elementwise: what underflowed was small in float64
    params, x, y = model.prepare()
    recorder = StepRecorder()
    model.loss_and_grads(recorder, params, x, y)
    reference = {t: v for _, _, kind, _, t, v in recorder.steps if kind == "dh"}
    low = run(model, Precision("fp16"), params, x, y)
    for _, _, kind, _, t, v in low.trace.steps:
        if kind == "dh":
            lost = (np.asarray(plain(v)) == 0) & (reference[t] != 0)
            assert np.all(np.abs(reference[t][lost]) < 2.0 ** -23), t
    exact = step_health(model, Precision("float64"))
    assert all(r.health.underflow == 0 and r.health.norm == r.health.norm_float64 for r in exact)


def test_storage_accumulation_runs_the_recurrent_kernel_in_fp16_arithmetic():
    """accumulate="storage": every operation of the cell in fp16 (StorageArithmetic), every
    stored step fp16, and the loss within fp16's reach of float32 accumulation's."""
    model = Model(UNSEEN["gru-last"])
    params, x, y = model.prepare()
    a = run(model, Precision("fp16"), params, x, y)
    s = run(model, Precision("fp16", accumulate="storage"), params, x, y)
    assert {format_of(v) for *_, v in s.trace.steps} == {"fp16"}
    assert abs(a.loss - s.loss) < 1e-2 * abs(a.loss)


# --- config, init, import ---------------------------------------------------------------------

@pytest.mark.parametrize("layer, message", [
    ({"type": "lstm"}, "layers[0] (lstm): lstm needs 'hidden_size'"),
    ({"type": "rnn", "hidden_size": 0}, "layers[0] (rnn): hidden_size must be >= 1"),
    ({"type": "rnn", "hidden_size": 2, "nonlinearity": "gelu"},
     "layers[0] (rnn): nonlinearity must be 'tanh' or 'relu', got 'gelu'"),
    ({"type": "gru", "hidden_size": 2, "output": "all"},
     "layers[0] (gru): output must be 'sequence' or 'last', got 'all'"),
    ({"type": "lstm", "hidden_size": 2, "bias": False, "forget_bias": 1.0},
     "layers[0] (lstm): forget_bias needs bias true"),
    ({"type": "gru", "hidden_size": 2, "forget_bias": 1.0}, "layers[0] (gru): unknown key(s)"),
    ({"type": "lstm", "hidden_size": 2, "bidirectional": True},
     "layers[0] (lstm): unknown key(s) ['bidirectional']"),
    ({"type": "lstm", "hidden_size": 2, "init_hh": "nope"},
     "layers[0] (lstm) init_hh: unknown init 'nope'"),
])
def test_a_bad_recurrent_config_is_one_clear_error_naming_the_layer(layer, message):
    with pytest.raises(ValueError) as e:
        Model(seq_spec([layer]))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_recurrent_layer_on_a_non_sequence_input_is_refused():
    with pytest.raises(ValueError, match=r"layers\[0\] \(gru\): gru expects input of shape "
                                         r"\(N, T, features\) \(batch first\), got a sample "
                                         r"shape of \(3,\)"):
        Model({"input_shape": [3], "layers": [{"type": "gru", "hidden_size": 2}],
               "loss": {"type": "mse"}})


def test_the_cli_reports_a_bad_recurrent_spec_in_one_line(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(seq_spec([{"type": "lstm", "hidden_size": 2, "output": "all"}])))
    assert main(["verify", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "layers[0] (lstm): output must be" in err


def test_torch_default_init_is_uniform_within_one_over_root_h_for_every_tensor():
    """nn.LSTM's reset_parameters: every tensor U(−1/√H, 1/√H) — the input weights too, not
    1/√fan_in as nn.Linear — drawn in torch's parameter order; forget_bias sets the forget
    slice of bias_ih to its value and of bias_hh to 0 without changing any other draw."""
    spec = seq_spec([{"type": "lstm", "hidden_size": 16, "num_layers": 2}], F=40)
    params = Model(spec).init_params()
    assert list(params) == [f"0.{w}_l{k}" for k in range(2)
                            for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    for name, v in params.items():
        assert np.max(np.abs(v)) <= 0.25 and np.max(np.abs(v)) > 0.24, name
    spec["layers"][0]["forget_bias"] = 1.0
    forget = Model(spec).init_params()
    for k in range(2):
        assert np.all(forget[f"0.bias_ih_l{k}"][16:32] == 1.0)
        assert np.all(forget[f"0.bias_hh_l{k}"][16:32] == 0.0)
        for name in (f"0.bias_ih_l{k}", f"0.bias_hh_l{k}"):
            kept = np.r_[0:16, 32:64]
            assert np.array_equal(forget[name][kept], params[name][kept])
        assert np.array_equal(forget[f"0.weight_hh_l{k}"], params[f"0.weight_hh_l{k}"])


def test_named_inits_apply_to_the_whole_tensor_and_init_hh_to_the_recurrent_weights_only():
    """{"init": "xavier_uniform", "init_hh": "orthogonal"}: W_ih from xavier over its (3H, F)
    fans, W_hh (3H, H) with orthonormal columns (torch.nn.init.orthogonal_ on the whole
    tensor), biases still torch's default."""
    spec = seq_spec([{"type": "gru", "hidden_size": 4, "init": "xavier_uniform",
                      "init_hh": "orthogonal", "bias_init": "zeros"}], F=5)
    params = Model(spec).init_params()
    w_hh = params["0.weight_hh_l0"]
    assert np.allclose(w_hh.T @ w_hh, np.eye(4), atol=1e-12)
    assert np.max(np.abs(params["0.weight_ih_l0"])) <= np.sqrt(6 / (12 + 5))
    assert not np.any(params["0.bias_ih_l0"]) and not np.any(params["0.bias_hh_l0"])


def test_the_rnn_vanishing_example_has_the_spectral_radius_its_description_states():
    model = Model.load(ROOT / "spec" / "examples" / "rnn-vanishing-40.json")
    rho = max(abs(np.linalg.eigvals(model.init_params()["0.weight_hh_l0"])))
    assert f"spectral radius of W_hh is {rho:.2f}" in model.spec["description"]


def test_regularization_weights_include_the_recurrent_weights():
    """"params": "weights" selects weight_ih_l<k> and weight_hh_l<k>, not the biases."""
    spec = seq_spec([{"type": "rnn", "hidden_size": 2, "num_layers": 2},
                     {"type": "dense", "out": 1}])
    spec["regularization"] = {"l2": 1e-3}
    assert Model(spec).regularized == ["0.weight_ih_l0", "0.weight_hh_l0", "0.weight_ih_l1",
                                       "0.weight_hh_l1", "1.weight"]


@needs_torch
def test_from_torch_reads_an_lstm_stack_and_its_gradients_are_torchs():
    """A torch module with an nn.LSTM (2 layers) whose h_n[-1] feeds an nn.Linear imports as
    lstm ("last") + dense under the module's names, and refnet's float64 gradients of it equal
    the module's own autograd within 1e-11 normwise (the same bound as above)."""
    import torch
    import torch.nn as nn

    from refnet import from_torch

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.LSTM(3, 5, num_layers=2, batch_first=True)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            _, (h, _) = self.encoder(x)
            return self.head(h[-1])

    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(3, 7, 3, dtype=torch.float64, requires_grad=True)
    model, params = from_torch(net, x.detach(), loss="mse")
    assert [(layer.type, layer.config["output"] if layer.type == "lstm" else None,
             layer.torch_name) for layer in model.layers] == [("lstm", "last", "encoder"),
                                                             ("dense", None, "head")]
    target = torch.randn(3, 2, dtype=torch.float64)
    nn.functional.mse_loss(net(x), target).backward()
    g = model.loss_and_grads(FLOAT64, params, x.detach().numpy(), target.numpy())
    for name, p in net.named_parameters():
        assert normwise(g.params[name], p.grad.numpy()) < 1e-11, name
    assert normwise(g.x, x.grad.numpy()) < 1e-11


@needs_torch
@pytest.mark.parametrize("module, message", [
    (lambda nn: nn.LSTM(3, 4), "unidirectional with batch_first=True"),
    (lambda nn: nn.GRU(3, 4, batch_first=True, bidirectional=True), "unidirectional"),
], ids=["batch_first_false", "bidirectional"])
def test_from_torch_refuses_what_refnets_recurrent_layers_are_not(module, message):
    import torch
    import torch.nn as nn

    from refnet import from_torch

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = module(nn)

        def forward(self, x):
            return self.rnn(x)[0]
    with pytest.raises(ValueError, match=message) as e:
        from_torch(Wrap(), torch.randn(2, 5, 3), loss="mse")
    assert "\n" not in str(e.value)
