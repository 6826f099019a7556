"""Every option of the issue-18 layers has a witness that fails when its formula is changed.

spec/operations.md's table "Options and their witnesses" lists each option of each new layer
with torch's name and its witness: a golden vector, or a test (a comparison with torch, or a
formula test). Here: the table is complete and its witnesses exist; and a changed formula —
planted, one at a time — makes the witness fail: `vectors check` reports a drift in the named
file, or the named test fails.
"""

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HAVE_TORCH

import refnet.layers.activations as acts
import refnet.layers.norm as norm
from refnet.interop.vectors import cases, check
from refnet.layers.registry import layer_types

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
NEW_TYPES = ["silu", "mish", "hardtanh", "relu6", "hardsigmoid", "hardswish", "celu", "softsign",
             "logsigmoid", "gelu", "groupnorm", "instancenorm2d"]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def witness_table():
    """{(type, option or None): [witness, ...]} from the table in spec/operations.md."""
    text = (ROOT / "spec" / "operations.md").read_text()
    section = text.split("### Options and their witnesses", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("type", "---"):
            continue
        option = None if cells[1] == "(none)" else cells[1].strip("`")
        rows[(cells[0], option)] = re.findall(r"`([^`]+)`", cells[3])
    return rows


def test_the_table_lists_every_option_of_every_new_layer_and_every_witness_exists():
    """Each new layer's options (its ``defaults``: torch's names) are rows of the table, an
    option-less layer has a "(none)" row, nothing else is listed; each witness is a committed
    vector that ``cases()`` generates, or a test function that exists."""
    rows = witness_table()
    expected = set()
    for kind in NEW_TYPES:
        options = sorted(layer_types()[kind].defaults)
        expected |= {(kind, o) for o in options} if options else {(kind, None)}
    assert set(rows) == expected
    generated = {c.name for c in cases()}
    for key, witnesses in rows.items():
        assert witnesses, key
        for w in witnesses:
            if w.startswith("spec/vectors/"):
                name = Path(w).stem
                assert (ROOT / w).is_file() and name in generated, (key, w)
            else:
                path, test = w.split("::")
                source = (ROOT / path).read_text()
                assert re.search(rf"^def {test}\(", source, re.M), (key, w)


def _drifted(tmp_path, names):
    for name in names:
        shutil.copy(VECTORS / f"{name}.json", tmp_path / f"{name}.json")
    problems = check(tmp_path)
    return {name for name in names if any(p.startswith(f"{name}.json:") for p in problems)}


def _where(cond):
    return np.asarray(cond, dtype=bool)


# name -> (function(monkeypatch) planting the change, vectors that must drift)
def plant_relu6_slope_one_at_six(mp):
    mp.setattr(acts.ReLU6, "backward", lambda self, bk, p, dh, c: (
        bk.where(_where(c[0] > 0) & _where(c[0] <= 6), dh, 0), {}))


def plant_hardtanh_slope_one_at_min_val(mp):
    mp.setattr(acts.Hardtanh, "backward", lambda self, bk, p, dh, c: (
        bk.where(_where(c[0] >= self._limits()[0]) & _where(c[0] < self._limits()[1]), dh, 0),
        {}))


def plant_hardtanh_ignores_max_val(mp):
    mp.setattr(acts.Hardtanh, "f", lambda self, bk, z: (
        bk.minimum(bk.maximum(z, self._limits()[0]), 1.0), None))


def plant_hardswish_middle_slope_at_three(mp):
    def backward(self, bk, p, dh, c):
        z = c[0]
        inner = bk.where(_where(z > -3) & _where(z <= 3), dh * (z / 3 + 0.5), 0)
        return bk.where(_where(z > 3), dh, inner), {}
    mp.setattr(acts.Hardswish, "backward", backward)


def plant_hardswish_without_the_z_factor(mp):
    mp.setattr(acts.Hardswish, "f", lambda self, bk, z: (
        bk.where(_where(z >= 3), z, bk.minimum(bk.maximum(bk.minimum(z, 3) + 3, 0), 6) / 6),
        None))


def plant_hardsigmoid_float32_sixth(mp):
    mp.setattr(acts.Hardsigmoid, "backward", lambda self, bk, p, dh, c: (
        bk.where(acts._between(c[0], -3, 3), dh * float(np.float32(1 / 6)), 0), {}))


def plant_celu_times_alpha(mp):
    def f(self, bk, z):
        q = bk.minimum(z, 0) * float(self.config["alpha"])
        return bk.where(_where(z > 0), z, self.config["alpha"] * bk.expm1(q)), q
    mp.setattr(acts.CELU, "f", f)


def plant_softsign_slope_not_squared(mp):
    mp.setattr(acts.Softsign, "df", lambda self, bk, z, a: 1 / a)


def plant_silu_slope_sigma_only(mp):
    mp.setattr(acts.SiLU, "df", lambda self, bk, z, saved: saved[0])


def plant_mish_slope_without_z(mp):
    def df(self, bk, z, saved):
        e, pos, num, den = saved
        w = bk.where(pos, 4 * (e * e) * (1 + e), 4 * e * (1 + e))
        return num / den + w / (den * den)
    mp.setattr(acts.Mish, "df", df)


def plant_logsigmoid_slope_sigma_of_z(mp):
    mp.setattr(acts.LogSigmoid, "df", lambda self, bk, z, e: acts.stable_sigmoid(bk, z)[0])


def plant_gelu_tanh_kappa(mp):
    mp.setattr(acts, "GELU_TANH_KAPPA", "0.0447")


def plant_gelu_approximate_ignored(mp):
    for method in ("f", "df"):
        original = getattr(acts.GELU, method)

        def erf_form(self, bk, *args, original=original):
            self.config = {**self.config, "approximate": "none"}
            return original(self, bk, *args)
        mp.setattr(acts.GELU, method, erf_form)


def _unbiased_normalize(bk, x, axes, eps):
    m = int(np.prod([x.shape[a] for a in axes]))
    mean = bk.sum(x, axis=axes, keepdims=True) / m
    centred = x - mean
    var = bk.sum(centred * centred, axis=axes, keepdims=True) / (m - 1)
    std = bk.sqrt(var + eps)
    return centred / std, std, m, mean, var


def plant_groupnorm_unbiased_variance(mp):
    mp.setattr(norm, "normalize", _unbiased_normalize)


def plant_groupnorm_ignores_groups(mp):
    mp.setattr(norm.GroupNorm, "_grouped", lambda self, a: a.reshape(
        (a.shape[0], 1) + tuple(a.shape[1:])))


def plant_groupnorm_eps_outside_the_root(mp):
    original = norm.normalize

    def normalize(bk, x, axes, eps):
        xhat, std, m, mean, var = original(bk, x, axes, 0.0)
        std = std + eps
        return (x - mean) / std, std, m, mean, var
    mp.setattr(norm, "normalize", normalize)


def plant_instancenorm_batch_statistics(mp):
    original = norm.InstanceNorm2d.forward

    def forward(self, bk, params, x, state):
        if state.train:
            xhat, std, m, _, _ = norm.normalize(bk, x, (0, 2, 3), self.config["eps"])
            ndim = len(x.shape)
            y = (norm.per_channel(params["weight"], ndim) * xhat
                 + norm.per_channel(params["bias"], ndim))
            return y, (xhat, std, m, (0, 2, 3))
        return original(self, bk, params, x, state)
    mp.setattr(norm.InstanceNorm2d, "forward", forward)


def plant_instancenorm_eval_without_eps(mp):
    original = norm.InstanceNorm2d.forward

    def forward(self, bk, params, x, state):
        if not state.train:
            self.config = {**self.config, "eps": 0.0}
        return original(self, bk, params, x, state)
    mp.setattr(norm.InstanceNorm2d, "forward", forward)


def plant_instancenorm_ignores_affine(mp):
    original = norm.InstanceNorm2d.forward

    def forward(self, bk, params, x, state):
        y, cache = original(self, bk, params, x, state)
        return cache[0], cache
    mp.setattr(norm.InstanceNorm2d, "forward", forward)


VECTOR_PLANTS = {
    "relu6' = 1 at 6": (plant_relu6_slope_one_at_six, ["relu6"]),
    "hardtanh' = 1 at min_val": (plant_hardtanh_slope_one_at_min_val, ["hardtanh"]),
    "hardtanh ignores max_val": (plant_hardtanh_ignores_max_val, ["hardtanh"]),
    "hardswish' = 3/2 at 3": (plant_hardswish_middle_slope_at_three, ["hardswish"]),
    "hardswish without the z factor": (plant_hardswish_without_the_z_factor, ["hardswish"]),
    "hardsigmoid' = float32(1/6)": (plant_hardsigmoid_float32_sixth, ["hardsigmoid"]),
    "celu with z·α for z/α": (plant_celu_times_alpha, ["celu"]),
    "softsign' = 1/(1 + |z|)": (plant_softsign_slope_not_squared, ["softsign"]),
    "silu' = σ(z)": (plant_silu_slope_sigma_only, ["silu"]),
    "mish' without z": (plant_mish_slope_without_z, ["mish"]),
    "logsigmoid' = σ(z)": (plant_logsigmoid_slope_sigma_of_z, ["logsigmoid"]),
    "gelu tanh with κ = 0.0447": (plant_gelu_tanh_kappa, ["gelu-tanh"]),
    "gelu approximate ignored": (plant_gelu_approximate_ignored, ["gelu-tanh"]),
    "groupnorm unbiased variance": (plant_groupnorm_unbiased_variance,
                                    ["groupnorm", "groupnorm-no-affine"]),
    "groupnorm ignores num_groups": (plant_groupnorm_ignores_groups,
                                     ["groupnorm", "groupnorm-no-affine"]),
    "groupnorm ε outside the root": (plant_groupnorm_eps_outside_the_root, ["groupnorm"]),
    "instancenorm2d batch statistics": (plant_instancenorm_batch_statistics,
                                        ["instancenorm2d-train"]),
    "instancenorm2d eval without ε": (plant_instancenorm_eval_without_eps,
                                      ["instancenorm2d-eval"]),
    "instancenorm2d ignores affine": (plant_instancenorm_ignores_affine,
                                      ["instancenorm2d-train", "instancenorm2d-eval"]),
}


@pytest.mark.parametrize("plant", sorted(VECTOR_PLANTS))
def test_a_changed_formula_makes_its_golden_vector_drift(plant, monkeypatch, tmp_path):
    """With the formula changed, `vectors check` reports a drift in each named vector (and the
    unchanged code reproduces it: checked first)."""
    change, names = VECTOR_PLANTS[plant]
    assert _drifted(tmp_path, names) == set()
    change(monkeypatch)
    assert _drifted(tmp_path, names) == set(names)


def plant_running_var_biased(mp):
    original = norm.InstanceNorm2d._update_running
    mp.setattr(norm.InstanceNorm2d, "_update_running", lambda self, bk, params, mean, var, m,
               state: original(self, bk, params, mean, var, m + 1e9, state))


def plant_momentum_swapped(mp):
    original = norm.InstanceNorm2d._update_running

    def update(self, bk, params, mean, var, m, state):
        self.config = {**self.config, "momentum": 1 - self.config["momentum"]}
        return original(self, bk, params, mean, var, m, state)
    mp.setattr(norm.InstanceNorm2d, "_update_running", update)


def plant_running_stats_never_used(mp):
    original = norm.InstanceNorm2d.forward

    def forward(self, bk, params, x, state):
        self.config = {**self.config, "track_running_stats": False}
        return original(self, bk, params, x, state)
    mp.setattr(norm.InstanceNorm2d, "forward", forward)


def plant_channel_counts_unchecked(mp):
    original = norm.GroupNorm.output_shape

    def output_shape(self, in_shape):
        self.config = {**self.config, "num_channels": None}
        return original(self, in_shape)
    mp.setattr(norm.GroupNorm, "output_shape", output_shape)


TEST_PLANTS = {
    "instancenorm2d running variance biased": (
        plant_running_var_biased,
        "test_group_instance_norm.py::test_instancenorm_running_statistics_follow_torchs_formulas"),
    "instancenorm2d momentum swapped": (
        plant_momentum_swapped,
        "test_group_instance_norm.py::test_instancenorm_running_statistics_follow_torchs_formulas"),
    "instancenorm2d track_running_stats ignored": (
        plant_running_stats_never_used,
        "test_group_instance_norm.py::test_instancenorm_running_statistics_follow_torchs_formulas"),
    "groupnorm num_channels unchecked": (
        plant_channel_counts_unchecked,
        "test_group_instance_norm.py::"
        "test_channel_counts_and_groups_are_checked_against_the_input"),
}


def _run_test(reference):
    path, name = reference.split("::")
    module = __import__(path[:-3])
    getattr(module, name)()


@pytest.mark.parametrize("plant", sorted(TEST_PLANTS))
def test_a_changed_formula_makes_its_named_test_fail(plant, monkeypatch):
    """Options with no vector of their own (running statistics are not in the vector format;
    num_channels is a check): the named test passes, and fails once the formula is changed."""
    change, reference = TEST_PLANTS[plant]
    _run_test(reference)
    change(monkeypatch)
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        _run_test(reference)


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("plant", ["instancenorm2d running variance biased",
                                   "instancenorm2d momentum swapped"])
def test_the_torch_comparison_of_running_statistics_fails_on_a_changed_formula(plant,
                                                                                monkeypatch):
    """The torch comparison of instancenorm2d's running statistics (momentum 0.3) fails with the
    unbiased variance or the momentum changed."""
    from test_group_instance_norm import test_group_and_instance_norm_match_torch_float64 as cmp
    case = ("instancenorm2d", {"affine": True, "track_running_stats": True, "momentum": 0.3}, True)
    cmp(case)
    TEST_PLANTS[plant][0](monkeypatch)
    with pytest.raises(AssertionError):
        cmp(case)


def test_the_kink_table_test_fails_when_a_kink_convention_is_changed(monkeypatch):
    """The per-backend kink test (torch's values, pinned) fails on relu6' = 1 at 6 and on
    hardswish' = 3/2 at 3."""
    from test_more_activations import KINKS
    from test_more_activations import (
        test_at_each_kink_every_backend_takes_torchs_value_and_derivative as kink_test,
    )
    cases_of = {("relu6", 6.0): plant_relu6_slope_one_at_six,
                ("hardswish", 3.0): plant_hardswish_middle_slope_at_three}
    for (kind, z), change in cases_of.items():
        row = next(r for r in KINKS if r[0] == kind and r[2] == z)
        kink_test(*row)
        with monkeypatch.context() as mp:
            change(mp)
            with pytest.raises(AssertionError):
                kink_test(*row)
