"""Training: regularization in the loss, the loop's records, and the claims it settles
(CLAIMS.md 10, 11, 21, 23, 24; numbers in spec/claims.md)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from refnet import Model, MPBackend, verify
from refnet.cli import main
from refnet.regularize import max_norm_constraint
from refnet.training.loop import train
from refnet.training.optim import SGD

EXAMPLES = Path(__file__).resolve().parent.parent / "spec" / "examples"


def mlp(act="relu", seed=0, init=None, width=32, depth=3, regularization=None, batch=64):
    init = init or {"name": "kaiming_normal", "nonlinearity": "relu"}
    layers = []
    for _ in range(depth):
        layers += [{"type": "dense", "out": width, "init": init}, {"type": act}]
    layers.append({"type": "dense", "out": 4, "init": init})
    spec = {"input_shape": [8], "seed": seed, "batch": batch, "layers": layers,
            "loss": {"type": "softmax_cross_entropy"}}
    if regularization:
        spec["regularization"] = regularization
    return Model(spec)


# --- regularization -----------------------------------------------------------------------------

def test_l1_and_l2_penalties_apply_to_weights_only_by_default_with_the_half_convention():
    """R = α₁Σ|w| + (α₂/2)Σw² over dense weights (not biases): the loss grows by exactly R and
    the gradients by α₁·sign(w) + α₂·w (checked at 50 digits)."""
    plain = mlp(depth=1, width=4, batch=3)
    reg = mlp(depth=1, width=4, batch=3, regularization={"l1": 0.01, "l2": 0.1})
    assert reg.regularized == ["0.weight", "2.weight"]
    params, x, y = plain.prepare()
    mp = MPBackend(50)
    g0 = plain.loss_and_grads(mp, params, x, y)
    g1 = reg.loss_and_grads(mp, params, x, y)
    r = sum(0.01 * np.abs(params[k]).sum() + 0.05 * (params[k] ** 2).sum() for k in reg.regularized)
    assert abs(float(mp.to_numpy(g1.loss - g0.loss)) - r) <= 1e-14 * r
    for k in params:
        extra = (0.01 * np.sign(params[k]) + 0.1 * params[k]) if k in reg.regularized else 0
        assert np.allclose(mp.to_numpy(g1.params[k] - g0.params[k]), extra, rtol=1e-14, atol=0)


def test_regularized_loss_passes_the_triangle_and_l1_at_zero_is_a_reported_kink():
    model = mlp(depth=1, width=3, batch=2, regularization={"l1": 0.05, "l2": 0.1})
    assert verify(model).passed
    params, x, y = model.prepare()
    params["0.weight"][1, 2] = 0.0
    report = verify(model, params, x, y, mode="element")
    weight = {t.name: t for t in report.tensors}["0.weight"]
    assert weight.fd_kinks == 1 and "L1 penalty" in weight.kinks[0]
    assert report.passed


def test_max_norm_constraint_caps_each_units_incoming_weight_norm():
    w = np.array([[3.0, 4.0], [0.3, 0.4]])
    out = max_norm_constraint({"w": w}, ["w"], 1.0)["w"]
    assert np.allclose(np.linalg.norm(out, axis=1), [1.0, 0.5], rtol=1e-15)


@pytest.mark.parametrize("bad, match", [({"l2": -1}, "l2 must be"), ({"l1": float("nan")}, "l1"),
                                        ({"params": ["9.weight"]}, "not parameters"),
                                        ({"weight_decay": 1}, "unknown key")])
def test_bad_regularization_specs_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        mlp(regularization=bad)


# --- the loop -----------------------------------------------------------------------------------

def test_training_records_loss_norms_ratios_and_dead_fractions_and_reduces_the_loss():
    model = mlp(depth=2, width=16)
    result = train(model, None, None, None, SGD(0.1, momentum=0.9), 30)
    assert result.stopped is None and result.steps_done == 30
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < first["loss"]
    assert set(first["grad_norm"]) == set(model.param_shapes())
    assert set(first["dead_fraction"]) == {"1", "3"}
    assert all(0 <= v < 1 for v in first["update_ratio"].values())


# --- claims -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("lr", [0.01, 0.1, 1.0, 10.0])
def test_claim10_vanishing_gradients_stall_the_first_layer_whatever_the_learning_rate(lr):
    """20-layer sigmoid MLP, N(0, 0.01): after 200 SGD steps the first layer's relative weight
    change stays below 1e-6 (measured: exactly 0 — its gradient ~4e-39 times lr is below half an
    ulp of its ~0.01 weights, so float64 cannot even represent the update) while the last layer's
    exceeds 1e-2 (measured 9.4, 20, 32, 101 for lr 0.01, 0.1, 1, 10)."""
    model = Model.load(EXAMPLES / "sigmoid-deep-20.json")
    params, x, y = model.prepare()
    result = train(model, params, x, y, SGD(lr), 200)
    assert result.stopped is None
    change = lambda k: (np.linalg.norm(result.params[k] - params[k])   # noqa: E731
                        / np.linalg.norm(params[k]))
    assert change("0.weight") < 1e-6
    assert change("38.weight") > 1e-2


@pytest.mark.slow
def test_claim21_a_large_learning_rate_leaves_more_dead_relus_and_leaky_relu_none():
    """20 seeds, ReLU MLP (8-32-32-32-4, Kaiming), 100 full-batch SGD steps: the dead fraction
    (units whose output is 0 on every input of the batch) after lr = 1 exceeds that after
    lr = 0.01 on average by more than 3 standard errors of the paired difference (measured means
    0.073 vs 0.015); with leaky_relu it is 0 by definition of the measure."""
    diffs = []
    for seed in range(20):
        dead = []
        for lr in (0.01, 1.0):
            result = train(mlp("relu", seed), None, None, None, SGD(lr), 100)
            assert result.stopped is None
            dead.append(np.mean(list(result.history[-1]["dead_fraction"].values())))
        diffs.append(dead[1] - dead[0])
    diffs = np.array(diffs)
    assert diffs.mean() > 3 * diffs.std(ddof=1) / math.sqrt(len(diffs))
    leaky = train(mlp("leaky_relu", 0), None, None, None, SGD(1.0), 100)
    assert all(v == 0 for v in leaky.history[-1]["dead_fraction"].values())


def test_claims11_and_23_a_large_learning_rate_diverges_and_clipping_keeps_it_finite():
    """ReLU MLP 8-64x4-4 with N(0, 1) weights, SGD lr = 0.5 (seed 0): the loss turns non-finite
    within 10 steps (measured: step 7, first inf in layer 2's dense output); the same run with
    clip-norm 1 stays finite for 50 steps."""
    model = mlp("relu", 0, init={"name": "normal", "std": 1.0}, width=64, depth=4)
    diverged = train(model, None, None, None, SGD(0.5), 50)
    assert diverged.stopped is not None and diverged.steps_done < 10
    assert "first non-finite value in layer" in diverged.stopped
    clipped = train(model, None, None, None, SGD(0.5), 50, clip_norm=1.0)
    assert clipped.stopped is None
    assert all(math.isfinite(h["loss"]) for h in clipped.history)


def test_claim24_l2_ends_with_a_smaller_weight_norm():
    """Same seed, 100 SGD steps at lr 0.1: α = 0.01 ends with ‖W‖ 13.4 against 14.7 for α = 0."""
    norms = []
    for alpha in (0.0, 0.01):
        model = mlp("relu", 0, regularization={"l2": alpha})
        result = train(model, None, None, None, SGD(0.1), 100)
        norms.append(math.sqrt(sum((result.params[k] ** 2).sum() for k in model.weight_names())))
    assert norms[1] < norms[0]


# --- CLI ----------------------------------------------------------------------------------------

def test_refnet_train_cli_writes_json_history_and_params(tmp_path, capsys):
    out = tmp_path / "trained.npz"
    code = main(["train", str(EXAMPLES / "relu-mlp-kaiming.json"), "--steps", "5", "--lr", "0.1",
                 "--optimizer", "adam", "--clip-norm", "1.0", "--l2", "1e-4",
                 "--save-params", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["history"]) == 5 and report["stopped"] is None
    with np.load(out, allow_pickle=False) as saved:
        assert "0.weight" in saved.files


@pytest.mark.parametrize("args, match", [(["--lr", "0"], "lr"), (["--lr", "nan"], "lr"),
                                         (["--lr", "0.1", "--clip-norm", "-1"], "max_norm"),
                                         (["--lr", "-1", "--optimizer", "adam"], "lr")])
def test_refnet_train_rejects_bad_settings_with_exit_2(args, match, capsys):
    code = main(["train", str(EXAMPLES / "relu-mlp-kaiming.json"), "--steps", "2"] + args)
    assert code == 2
    assert match in capsys.readouterr().err


def test_refnet_train_rejects_an_unknown_optimizer(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(EXAMPLES / "relu-mlp-kaiming.json"), "--steps", "2", "--lr", "0.1",
              "--optimizer", "lion"])
    assert exit_info.value.code == 2 and "invalid choice: 'lion'" in capsys.readouterr().err
