"""Shared test set-up: hypothesis profiles, and the no-global-state guard around every test."""

import json
import os

import mpmath
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# dev: quick local runs. ci: more examples, derandomized so that CI is reproducible.
settings.register_profile("dev", max_examples=8, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE",
                                     "ci" if os.environ.get("CI") == "true" else "dev"))

try:
    import torch  # noqa: F401
    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False


@pytest.fixture(autouse=True)
def global_mpmath_precision_untouched():
    """Every test, and every refnet call in it, leaves mpmath.mp's precision as it found it."""
    before = (mpmath.mp.dps, mpmath.mp.prec)
    yield
    assert (mpmath.mp.dps, mpmath.mp.prec) == before, (
        f"mpmath.mp changed from dps/prec {before} to {(mpmath.mp.dps, mpmath.mp.prec)}")


@pytest.fixture(autouse=True)
def numpy_errors_are_loud():
    """Inside tests overflow, invalid and divide-by-zero are errors: no silent inf/NaN
    (underflow is legitimate)."""
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        yield


def small_spec(activation="tanh", loss="mse", widths=(4,), in_dim=3, out_dim=2, seed=0,
               batch=3, init="xavier_normal", **act_options):
    """An MLP spec: dense layers of the given widths, each followed by ``activation``."""
    layers = []
    for w in widths:
        layers.append({"type": "dense", "out": w, "init": init, "bias_init":
                       {"name": "normal", "std": 0.5}})
        layers.append({"type": activation, **act_options})
    layers.append({"type": "dense", "out": out_dim, "init": init})
    return {"input_shape": [in_dim], "seed": seed, "batch": batch, "layers": layers,
            "loss": {"type": loss}}


@pytest.fixture
def spec_file(tmp_path):
    """A small tanh MLP with cross-entropy, written as a model spec file (for the CLI tests)."""
    path = tmp_path / "model.json"
    path.write_text(json.dumps(small_spec("tanh", loss="softmax_cross_entropy", widths=(4,),
                                          out_dim=3)))
    return path


def reference_rounding(reference):
    """Half an ulp of a correctly rounded reference (``MPBackend.to_numpy`` of the exact
    value): a bound e on |v − exact| allows |v − fl(exact)| ≤ e + ½ ulp(fl(exact)), since
    fl(exact) itself lies that far from the exact value. A float64 result one ulp from
    fl(exact) can be within e of the exact value (random_nets seed 4627171: 0.53 e)."""
    return 0.5 * np.spacing(np.abs(np.asarray(reference, dtype=np.float64)))


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of the command line; argparse's own errors exit through
    SystemExit."""
    from refnet.cli import main
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
