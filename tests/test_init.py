"""Initializers: torch.nn.init names, gains and distributions, drawn from the Generator passed in."""

import math

import numpy as np
import pytest
from conftest import HAVE_TORCH

from refnet.init import INITIALIZERS, calculate_gain, fans, initialize

SHAPE = (64, 48)          # (out, in): fan_in 48, fan_out 64
N = SHAPE[0] * SHAPE[1]

# name -> (options, expected mean, expected std, uniform half-width or None)
FAN_IN, FAN_OUT = 48, 64
EXPECTED = {
    "normal": ({"mean": 0.5, "std": 0.01}, 0.5, 0.01, None),
    "uniform": ({"a": -2.0, "b": 1.0}, -0.5, 3 / math.sqrt(12), None),
    "xavier_uniform": ({"gain": 2.0}, 0.0, 2 * math.sqrt(2 / (FAN_IN + FAN_OUT)),
                       2 * math.sqrt(6 / (FAN_IN + FAN_OUT))),
    "xavier_normal": ({"gain": 2.0}, 0.0, 2 * math.sqrt(2 / (FAN_IN + FAN_OUT)), None),
    "kaiming_uniform": ({"nonlinearity": "relu"}, 0.0, math.sqrt(2 / FAN_IN),
                        math.sqrt(6 / FAN_IN)),
    "kaiming_normal": ({"mode": "fan_out", "nonlinearity": "relu"}, 0.0, math.sqrt(2 / FAN_OUT),
                       None),
    "lecun_uniform": ({}, 0.0, math.sqrt(1 / FAN_IN), math.sqrt(3 / FAN_IN)),
    "lecun_normal": ({}, 0.0, math.sqrt(1 / FAN_IN), None),
    "torch_default": ({}, 0.0, 1 / math.sqrt(FAN_IN) / math.sqrt(3), 1 / math.sqrt(FAN_IN)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_mean_and_std_match_the_distribution_within_5_standard_errors(name):
    """Mean within 5·σ/√N and standard deviation within 5·σ/√(2N) (normal) — derived from the
    sample size N = 3072, not tuned (false-alarm rate ~6e-7 per assertion)."""
    options, mean, std, _ = EXPECTED[name]
    w = initialize({"name": name, **options}, SHAPE, np.random.default_rng(1))
    assert w.shape == SHAPE
    assert abs(w.mean() - mean) <= 5 * std / math.sqrt(N)
    # For the uniform, Var(s²) is smaller than the normal's; 5·σ/√(2N) is conservative for both.
    assert abs(w.std() - std) <= 5 * std / math.sqrt(2 * N)


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items() if e[3] is not None])
def test_uniform_inits_never_exceed_their_bound(name):
    """max|W| <= the documented half-width for every draw (Glorot/He/LeCun uniform)."""
    options, _, _, bound = EXPECTED[name]
    for seed in range(20):
        w = initialize({"name": name, **options}, SHAPE, np.random.default_rng(seed))
        assert np.max(np.abs(w)) <= bound


@pytest.mark.parametrize("name", sorted(INITIALIZERS))
def test_same_seed_gives_the_same_weights_bit_for_bit(name):
    spec = {"name": name, "val": 0.3} if name == "constant" else name
    a = initialize(spec, SHAPE, np.random.default_rng(42))
    b = initialize(spec, SHAPE, np.random.default_rng(42))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("shape", [(8, 8), (5, 12), (12, 5), (4, 3, 2, 2)])
def test_orthogonal_init_has_orthonormal_rows_or_columns_times_gain(shape):
    """W Wᵀ = g²I (rows <= cols) or WᵀW = g²I, to a few float64 ulps per entry (QR is backward
    stable: ‖QᵀQ − I‖ ~ n·u)."""
    gain = 1.7
    w = initialize({"name": "orthogonal", "gain": gain}, shape, np.random.default_rng(0))
    flat = w.reshape(shape[0], -1)
    gram = flat @ flat.T if flat.shape[0] <= flat.shape[1] else flat.T @ flat
    n = max(flat.shape)
    assert np.max(np.abs(gram - gain**2 * np.eye(gram.shape[0]))) <= 8 * n * 2.0**-53 * gain**2


def test_constant_zeros_ones():
    rng = np.random.default_rng(0)
    assert np.all(initialize("zeros", (3, 2), rng) == 0)
    assert np.all(initialize("ones", (3, 2), rng) == 1)
    assert np.all(initialize({"name": "constant", "val": -0.5}, (3,), rng) == -0.5)


TORCH_GAINS = {("linear", None): 1.0, ("conv2d", None): 1.0, ("sigmoid", None): 1.0,
               ("tanh", None): 5 / 3, ("relu", None): math.sqrt(2),
               ("leaky_relu", None): math.sqrt(2 / (1 + 0.01**2)),
               ("leaky_relu", 0.2): math.sqrt(2 / (1 + 0.2**2)), ("selu", None): 0.75}


@pytest.mark.parametrize("key", sorted(TORCH_GAINS, key=str))
def test_calculate_gain_matches_torch_values(key):
    assert calculate_gain(*key) == TORCH_GAINS[key]


@pytest.mark.parametrize("name", ["elu", "gelu", "softplus", "scaled_sigmoid"])
def test_gains_torch_lacks_keep_the_second_moment_like_relus_sqrt2(name):
    """For activations torch has no gain for, g = 1/√E[f(z)²], z ~ N(0,1): then E[(g·f(z))²] = 1,
    which is the property √2 has for relu. Checked by Monte Carlo within 5 standard errors."""
    from refnet import FLOAT64
    from refnet.layers.activations import ACTIVATIONS
    g = calculate_gain(name)
    z = np.random.default_rng(0).standard_normal(200_000)
    layer = ACTIVATIONS[name]({"type": name}, (z.size,), "test")
    h, _ = layer.forward(FLOAT64, {}, z[None, :])
    sq = (g * h[0]) ** 2
    assert abs(sq.mean() - 1) <= 5 * sq.std() / math.sqrt(z.size)


def test_gain_for_prelu_uses_its_default_slope_and_unknown_names_raise():
    assert calculate_gain("prelu") == math.sqrt(2 / (1 + 0.25**2))
    with pytest.raises(ValueError, match="unknown nonlinearity 'swish'"):
        calculate_gain("swish")


def test_fans_follow_torch_and_need_two_dimensions():
    assert fans((32, 16, 3, 3)) == (16 * 9, 32 * 9)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        initialize("xavier_uniform", (10,), np.random.default_rng(0), "layers[0] (dense) init")


@pytest.mark.parametrize("bad, match", [
    ("glorot", "unknown init 'glorot'"),
    ({"name": "normal", "sigma": 1}, "no option"),
    ({"name": "normal", "std": -1}, "std >= 0"),
    ({"name": "constant"}, "needs 'val'"),
    ({"std": 1}, "needs a 'name'"),
    ({"name": "uniform", "a": 1, "b": 0}, "a <= b"),
    ({"name": "kaiming_normal", "mode": "fan_avg"}, "mode must be"),
])
def test_bad_init_specs_raise_value_errors_naming_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        initialize(bad, (4, 4), np.random.default_rng(0), "layers[0] (dense) init")


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_calculate_gain_equals_torch_nn_init():
    import torch
    for (name, param), _ in TORCH_GAINS.items():
        assert calculate_gain(name, param) == pytest.approx(
            torch.nn.init.calculate_gain(name, param), rel=1e-15)
