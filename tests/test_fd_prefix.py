"""The finite-difference prefix cache (issue 14): an FD evaluation that perturbs a tensor of
top-level layer k starts at layer k from the cached unperturbed input. It must give the loss bit
for bit (mpf equality) and the kink signatures of the full forward, for every tensor."""

import functools

import numpy as np
import pytest

from refnet import Model
from refnet.numerics.backend import FLOAT64
from refnet.verification import triangle
from refnet.verification.triangle import _Problem

MLP_TANH = {"input_shape": [5], "seed": 1, "batch": 3,
            "layers": [{"type": "dense", "out": 6}, {"type": "tanh"},
                       {"type": "dense", "out": 4}, {"type": "tanh"}, {"type": "dense", "out": 3}],
            "loss": {"type": "softmax_cross_entropy"}}
MLP_RELU_DROPOUT = {"input_shape": [5], "seed": 2, "batch": 4, "mode": "train",
                    "layers": [{"type": "dense", "out": 8}, {"type": "relu"},
                               {"type": "dropout", "p": 0.4},
                               {"type": "dense", "out": 6}, {"type": "relu"},
                               {"type": "dense", "out": 3}],
                    "loss": {"type": "softmax_cross_entropy"}}
CNN_BN_POOL = {"input_shape": [1, 4, 4], "seed": 3, "batch": 3, "mode": "train",
               "layers": [{"type": "conv2d", "out_channels": 2, "kernel_size": 3, "padding": "same"},
                          {"type": "batchnorm"}, {"type": "relu"},
                          {"type": "maxpool2d", "kernel_size": 2},
                          {"type": "conv2d", "out_channels": 2, "kernel_size": 1},
                          {"type": "batchnorm"}, {"type": "relu"},
                          {"type": "flatten"}, {"type": "dense", "out": 3}],
               "loss": {"type": "softmax_cross_entropy"}}
RESIDUAL = {"input_shape": [4], "seed": 4, "batch": 3, "mode": "train",
            "layers": [{"type": "dense", "out": 4}, {"type": "relu"},
                       {"type": "residual", "scale": 0.5, "body": [
                           {"type": "dense", "out": 4}, {"type": "batchnorm"}, {"type": "relu"},
                           {"type": "dropout", "p": 0.3}, {"type": "dense", "out": 4}]},
                       {"type": "residual", "body": [{"type": "dense", "out": 3}, {"type": "tanh"}],
                        "shortcut": [{"type": "dense", "out": 3, "bias": False},
                                     {"type": "batchnorm"}]},
                       {"type": "dense", "out": 2}],
            "loss": {"type": "mse"}}
REGULARIZED = {"input_shape": [4], "seed": 5, "batch": 3,
               "layers": [{"type": "dense", "out": 5}, {"type": "relu"},
                          {"type": "dense", "out": 5}, {"type": "tanh"}, {"type": "dense", "out": 2}],
               "loss": {"type": "softmax_cross_entropy"},
               "regularization": {"l1": 1e-2, "l2": 3e-2, "params": "all"}}
REGULARIZED_WEIGHTS_L2 = {**REGULARIZED, "seed": 6, "regularization": {"l2": 0.1}}

MODELS = {"tanh-mlp": MLP_TANH, "relu-dropout-mlp": MLP_RELU_DROPOUT, "cnn-bn-maxpool": CNN_BN_POOL,
          "residual": RESIDUAL, "l1-l2": REGULARIZED, "l2-weights": REGULARIZED_WEIGHTS_L2}


def _problems(spec):
    model = Model(spec)
    params, x, y = model.prepare()
    first = model.default_state()
    model.loss_and_grads(FLOAT64, params, x, y, first)          # draws the dropout masks
    return (model, _Problem(model, params, x, y, first),
            _Problem(model, params, x, y, first, prefix_cache=False))


def _same_signatures(a, b):
    if len(a) != len(b):
        return False
    for sa, sb in zip(a, b):
        if len(sa) != len(sb):
            return False
        for ka, kb in zip(sa, sb):
            ka, kb = np.asarray(ka), np.asarray(kb)
            if ka.shape != kb.shape or ka.dtype != kb.dtype or not np.array_equal(ka, kb):
                return False
    return True


def _same_loss(a, b):
    a, b = triangle._scalar(a), triangle._scalar(b)
    if isinstance(a, np.floating) or isinstance(b, np.floating):
        return np.asarray(a).tobytes() == np.asarray(b).tobytes()
    return a._mpf_ == b._mpf_             # the same mpf, bit for bit (two contexts, one dps)


def _mismatches(model, cached, full, steps=(1e-7, 0.3)):
    """(tensor, backend, step) wherever the cached loss or signatures differ from the full
    forward's; the big step crosses kinks, so changed signatures are compared too."""
    rng = np.random.default_rng(0)
    bad = []
    names = list(model.param_shapes()) + ["x"]
    for name in names:
        base = cached.base(name)
        v = rng.standard_normal(base.shape)
        for bk in (FLOAT64, cached.mp(40), cached.mp(23)):
            bk_full = FLOAT64 if bk is FLOAT64 else full.mp(bk.dps)
            point = bk.asarray(base)
            for h in steps:
                for sign in (1, -1):
                    value = point + bk.asarray(sign * h * v)
                    lc, sc = cached.loss(bk, name, value)
                    lf, sf = full.loss(bk_full, name, bk_full.asarray(value))
                    if not (_same_loss(lc, lf) and _same_signatures(sc, sf)):
                        bad.append((name, bk.name, sign * h))
    return bad


@pytest.mark.parametrize("which", sorted(MODELS))
def test_the_cached_prefix_gives_the_full_forwards_loss_and_kink_signatures_bit_for_bit(which):
    model, cached, full = _problems(MODELS[which])
    assert _mismatches(model, cached, full) == []


def test_the_big_step_does_cross_kinks_so_that_changed_signatures_are_compared():
    model, cached, _ = _problems(MLP_RELU_DROPOUT)
    base_sig = cached.loss(FLOAT64, "0.weight", cached.base("0.weight"))[1]
    v = np.random.default_rng(0).standard_normal(cached.base("0.weight").shape)
    moved = cached.loss(FLOAT64, "0.weight", cached.base("0.weight") + 0.3 * v)[1]
    assert not _same_signatures(base_sig, moved)


def test_the_prefix_is_computed_once_per_backend_and_not_rerun():
    """After the prefix exists, perturbing the last layer's weight runs no earlier layer."""
    model, cached, _ = _problems(MLP_RELU_DROPOUT)
    bk = cached.mp(30)
    last = f"{len(model.layers) - 1}.weight"
    cached.loss(bk, last, bk.asarray(cached.base(last)))
    calls = []
    first = model.layers[0]
    original = first.forward
    first.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        cached.loss(bk, last, bk.asarray(cached.base(last)) * 2)
        assert calls == []
        cached.loss(bk, "0.weight", bk.asarray(cached.base("0.weight")) * 2)
        assert calls == [1]
    finally:
        del first.forward


def _planted(monkeypatch, bug):
    original = _Problem._loss_from
    if bug == "one layer too late":
        def planted(self, bk, k, name, value):
            return original(self, bk, min(k + 1, len(self.model.layers) - 1), name, value)
    elif bug == "stale penalty":
        # The perturbed tensor's penalty terms taken from the base point (the first computed).
        terms_of, stale = triangle._penalty_terms, {}

        def stale_terms(bk, w, name, l1, l2):
            key = (bk.name, name)
            if key not in stale:
                stale[key] = terms_of(bk, w, name, l1, l2)
            return stale[key]
        monkeypatch.setattr(triangle, "_penalty_terms", stale_terms)
        return
    elif bug == "stale signature":
        def planted(self, bk, k, name, value):
            loss, signatures = original(self, bk, k, name, value)
            # the layer after k carried from the cache too
            return loss, self._prefix(bk).signatures[:k + 2] + signatures[k + 2:]
    monkeypatch.setattr(_Problem, "_loss_from", planted)


@pytest.mark.parametrize("bug, which, caught", [
    ("one layer too late", "tanh-mlp", ["0.weight", "0.bias", "2.weight", "2.bias"]),
    ("one layer too late", "residual", ["0.weight", "0.bias", "2.body.0.weight", "3.body.0.bias",
                                        "3.shortcut.0.weight"]),
    ("one layer too late", "cnn-bn-maxpool", ["0.weight", "1.weight", "4.weight", "5.bias"]),
    ("stale penalty", "l1-l2", ["0.weight", "0.bias", "2.weight", "4.bias"]),
    ("stale signature", "relu-dropout-mlp", ["0.weight", "3.weight"]),
])
def test_planted_bugs_in_the_cached_path_are_caught(monkeypatch, bug, which, caught):
    model, cached, full = _problems(MODELS[which])
    _planted(monkeypatch, bug)
    bad = {name for name, _, _ in _mismatches(model, cached, full)}
    assert set(caught) <= bad
    assert "x" not in bad                         # x never takes the cached path


def test_verify_reports_the_same_with_and_without_the_cache(monkeypatch):
    """End to end: the whole report (FD digits included) is the same either way."""
    from refnet import verify
    model = Model(MLP_RELU_DROPOUT)
    with_cache = verify(model, directions=1).to_dict()
    monkeypatch.setattr(triangle, "_Problem", functools.partial(_Problem, prefix_cache=False))
    without = verify(model, directions=1).to_dict()
    assert with_cache == without
    assert with_cache["passed"]


def test_a_new_backend_of_the_same_name_gets_its_own_conversions_and_prefix():
    """Values of one private mpmath context are never reused by another backend of the same
    dps: each backend object has its own cache entry, and the loss stays the full forward's."""
    model, cached, full = _problems(MLP_TANH)
    first = cached.mp(30)
    cached.loss(first, "2.weight", first.asarray(cached.base("2.weight")))
    other = triangle.MPBackend(30)
    value = other.asarray(cached.base("2.weight")) * 2
    loss, _ = cached.loss(other, "2.weight", value)
    assert all(type(v) is type(other.ctx.mpf(0)) for v in cached._prefix(other).inputs[2].flat)
    assert _same_loss(loss, full.loss(full.mp(30), "2.weight", value)[0])


def test_evicted_backends_are_rebuilt_and_still_give_the_full_forward(monkeypatch):
    """With room for one backend only, every switch of precision evicts and rebuilds."""
    monkeypatch.setattr(_Problem, "KEEP", 1)
    model, cached, full = _problems(RESIDUAL)
    assert _mismatches(model, cached, full) == []
    assert len(cached._cache) == 1 and len(cached._backends) == 1
