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


# --- the losses: "Options by torch name: the losses" ---------------------------------------------

import refnet.losses as losses  # noqa: E402

# Rows that name a convention or a kind of input rather than a config key.
LOSS_CONVENTIONS = {("l1", "d = 0"), ("smooth_l1", "beta=0"),
                    ("softmax_cross_entropy", "target: class probabilities"),
                    ("softmax_cross_entropy", "input (N, C, d1, ...)")}


def loss_table():
    """{(loss, option): [vector names]} from the losses' options table of spec/operations.md."""
    text = (ROOT / "spec" / "operations.md").read_text()
    section = text.split("### Options by torch name: the losses", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if not line.startswith("|") or len(cells) != 5 or cells[0] in ("loss", "---"):
            continue
        rows[(cells[0].strip("`"), cells[1].strip("`"))] = re.findall(r"`([^`]+)`", cells[3])
    return rows


def _upstream_ignored(mp):
    original = losses.Loss.forward

    def forward(self, bk, z, y):
        if isinstance(y, losses.Targets):
            y = losses.Targets(y.y, np.ones(np.shape(y.upstream)))
        return original(self, bk, z, y)
    mp.setattr(losses.Loss, "forward", forward)


def _mean_over_the_batch(mp):
    mp.setattr(losses.Loss, "_mean_divisor", lambda self, bk, y, z: z.shape[0])


def _sign_of_zero_one(mp):
    mp.setattr(losses, "_sign", lambda bk, d: bk.where(_where(d >= 0), 1.0, -1.0))


def _mean_and_sum_swapped(cls):
    def plant(mp):
        original = losses.Loss.forward

        def forward(self, bk, z, y):
            if isinstance(self, cls) and self.reduction in ("mean", "sum"):
                saved, self.reduction = self.reduction, {"mean": "sum", "sum": "mean"}[
                    self.reduction]
                try:
                    return original(self, bk, z, y)
                finally:
                    self.reduction = saved
            return original(self, bk, z, y)
        mp.setattr(losses.Loss, "forward", forward)
    return plant


def _smooth_l1_beta_multiplied(mp):
    def elementwise(self, bk, z, y):
        d = z - bk.asarray(y)
        a, beta = bk.abs(d), self.beta
        if beta == 0:
            return a, d
        return bk.where(_where(a < beta), 0.5 * a * a * beta, a - 0.5 * beta), d
    mp.setattr(losses.SmoothL1, "elementwise", elementwise)


def _smooth_l1_kernel_at_beta_zero(mp):
    original = losses.SmoothL1.d_elementwise

    def d_elementwise(self, bk, d):
        if self.beta == 0:                 # torch's kernel: x <= -beta -> -1, x >= beta -> 1
            return bk.where(_where(d <= 0), -1.0, 1.0)
        return original(self, bk, d)
    mp.setattr(losses.SmoothL1, "d_elementwise", d_elementwise)


def _huber_without_the_delta_factor(mp):
    def elementwise(self, bk, z, y):
        d = z - bk.asarray(y)
        a, delta = bk.abs(d), self.delta
        return bk.where(_where(a < delta), 0.5 * a * a, a - 0.5 * delta), d
    mp.setattr(losses.Huber, "elementwise", elementwise)


def _option_ignored(key):
    def plant(mp):
        original = losses._sample_weight
        mp.setattr(losses, "_sample_weight", lambda where, k, value, shape: (
            None if k == key else original(where, k, value, shape)))
    return plant


def _pos_weight_on_the_negatives(mp):
    original_f, original_d = losses.BCEWithLogits.elementwise, losses.BCEWithLogits.d_elementwise

    def flipped(y):
        return 1 - np.asarray(y)

    def elementwise(self, bk, z, y):
        ell, cache = original_f(self, bk, z, y)
        if self.pos_weight is None:
            return ell, cache
        base, _ = original_f(self.__class__({"type": self.type}, self.out_shape), bk, z, y)
        e = bk.exp(-bk.abs(z))
        p = bk.asarray(self.pos_weight)
        ell = base + bk.asarray(flipped(y)) * (p - 1) * (bk.maximum(-z, 0) + bk.log1p(e))
        if self.weight is not None:
            ell = ell * bk.asarray(self.weight)
        return ell, cache + (flipped(y),)

    def d_elementwise(self, bk, cache):
        if len(cache) == 4:
            return original_d(self, bk, cache)
        z, y, p, w, negatives = cache
        s, _ = losses.stable_sigmoid(bk, z)
        g = s - y - bk.asarray(negatives) * (p - 1) * (1 - s)
        return g if w is None else g * w
    mp.setattr(losses.BCEWithLogits, "elementwise", elementwise)
    mp.setattr(losses.BCEWithLogits, "d_elementwise", d_elementwise)


def _weighted_mean_over_the_count(mp):
    def divisor(self, bk, y, z):
        labels, kept = self._labels(y)
        return labels.size if kept is None else int(np.sum(kept))
    mp.setattr(losses._ClassLoss, "_mean_divisor", divisor)


def _ignored_labels_in_the_divisor(mp):
    def divisor(self, bk, y, z):
        labels, _ = self._labels(y)
        if self.weight is not None:
            return bk.sum(bk.asarray(self.weight[labels]))
        return labels.size
    mp.setattr(losses._ClassLoss, "_mean_divisor", divisor)


def _smoothing_over_the_other_classes(mp):
    mp.setattr(losses.SoftmaxCrossEntropy, "_share", lambda self, eps: eps / (self.classes - 1))


def _probabilities_mean_over_the_elements(mp):
    original = losses.SoftmaxCrossEntropy._mean_divisor
    mp.setattr(losses.SoftmaxCrossEntropy, "_mean_divisor", lambda self, bk, y, z: (
        int(np.prod(z.shape)) if self._probabilities(y) else original(self, bk, y, z)))


def _class_axis_last(mp):
    mp.setattr(losses._ClassLoss, "_rows", lambda self, a: a.reshape(-1, self.classes))
    mp.setattr(losses._ClassLoss, "_unrows", lambda self, g, shape: g.reshape(shape))


def _class_weight_ignored(mp):
    mp.setattr(losses._ClassLoss, "_class_weight", lambda self, value: None)


def _ignored_as_class_zero(mp):
    original = losses._ClassLoss._labels
    mp.setattr(losses._ClassLoss, "_labels", lambda self, y: (original(self, y)[0], None))


LOSS_PLANTS = {
    ("mse", "reduction"): _upstream_ignored,
    ("l1", "reduction"): _mean_over_the_batch,
    ("l1", "d = 0"): _sign_of_zero_one,
    ("smooth_l1", "reduction"): _mean_and_sum_swapped(losses.SmoothL1),
    ("smooth_l1", "beta"): _smooth_l1_beta_multiplied,
    ("smooth_l1", "beta=0"): _smooth_l1_kernel_at_beta_zero,
    ("huber", "reduction"): _mean_over_the_batch,
    ("huber", "delta"): _huber_without_the_delta_factor,
    ("bce_with_logits", "reduction"): _upstream_ignored,
    ("bce_with_logits", "weight"): _option_ignored("weight"),
    ("bce_with_logits", "pos_weight"): _pos_weight_on_the_negatives,
    ("softmax_cross_entropy", "reduction"): _upstream_ignored,
    ("softmax_cross_entropy", "weight"): _weighted_mean_over_the_count,
    ("softmax_cross_entropy", "ignore_index"): _ignored_labels_in_the_divisor,
    ("softmax_cross_entropy", "label_smoothing"): _smoothing_over_the_other_classes,
    ("softmax_cross_entropy", "target: class probabilities"):
        _probabilities_mean_over_the_elements,
    ("softmax_cross_entropy", "input (N, C, d1, ...)"): _class_axis_last,
    ("nll", "reduction"): _mean_and_sum_swapped(losses.NLL),
    ("nll", "weight"): _class_weight_ignored,
    ("nll", "ignore_index"): _ignored_as_class_zero,
}


def test_the_loss_table_lists_every_option_of_every_loss_and_its_vectors_exist():
    """Every loss's options (``reduction`` and its ``defaults``, torch's names) are rows, besides
    the named conventions; every row has a planted change here; every vector it names is a
    committed file that ``cases()`` generates."""
    rows = loss_table()
    expected = {(kind, option) for kind, cls in losses.LOSSES.items()
                for option in ["reduction"] + sorted(cls.defaults)}
    assert set(rows) == expected | LOSS_CONVENTIONS
    assert set(LOSS_PLANTS) == set(rows)
    generated = {c.name for c in cases()}
    for key, names in rows.items():
        assert names, key
        for name in names:
            assert (VECTORS / f"{name}.json").is_file() and name in generated, (key, name)


def _drifted_or_broken(tmp_path, names):
    """The named vectors that no longer check: a drifted field, or a computation that cannot
    run on the file any more (a shape or an index that no longer fits)."""
    out = set()
    for name in names:
        single = tmp_path / name
        single.mkdir(parents=True, exist_ok=True)
        shutil.copy(VECTORS / f"{name}.json", single / f"{name}.json")
        try:
            if check(single):
                out.add(name)
        except (ValueError, IndexError):
            out.add(name)
    return out


@pytest.mark.parametrize("row", sorted(LOSS_PLANTS), ids=lambda r: f"{r[0]}-{r[1]}")
def test_a_changed_loss_formula_makes_its_golden_vectors_fail(row, monkeypatch, tmp_path):
    """Unchanged, every vector of the row checks; with the row's formula changed — the upstream
    ignored, a mean over the batch, sign(0) = 1, ε/(C − 1), the weighted mean over the count,
    the class axis taken last, ... — every one of them fails."""
    names = loss_table()[row]
    assert _drifted_or_broken(tmp_path / "before", names) == set()
    LOSS_PLANTS[row](monkeypatch)
    assert _drifted_or_broken(tmp_path / "after", names) == set(names)
