"""refnet study: the textbook picture of vanishing/exploding gradients, reproduced and judged;
outputs people can read; diverging configurations are verdicts, not crashes."""

import json
import math
import struct

import pytest

from refnet.cli import main
from refnet.progress import Reporter
from refnet.study.grid import (
    NORM_RANGE,
    RATIO_RANGE,
    Config,
    judge,
    measure,
    run_study,
    sparkline,
)

DEPTH = 12


def verdict(activation, init, arch="plain", depth=DEPTH, precision="float64", check=False):
    results = measure(Config(activation, init, depth, arch), (precision,), check=check)
    return results[0]


def test_sigmoid_with_small_normal_init_vanishes_and_more_so_with_depth():
    """sigmoid + N(0, 0.01): each layer scales the backward signal by ≈ σ'·std·√n = 0.25·0.01·√32
    ≈ 0.014, so first/last ≈ 0.014^depth: below the 1e-3 threshold already at depth 3, and at
    depth 12 around 1e-22 (measured 1.3e-22)."""
    shallow, deep = verdict("sigmoid", "normal-0.01", depth=3), verdict("sigmoid", "normal-0.01")
    assert shallow.verdict == deep.verdict == "vanishing"
    assert deep.ratio < shallow.ratio * 1e-10
    per_layer = deep.ratio ** (1 / DEPTH)
    assert 0.25 * 0.01 * math.sqrt(32) / 3 < per_layer < 0.25 * 0.01 * math.sqrt(32) * 3


def test_relu_with_unit_normal_init_explodes():
    """relu + N(0, 1): forward and backward grow by ≈ √(n/2) = 4 per layer: 4^12 ≈ 1.7e7."""
    r = verdict("relu", "normal-1")
    assert r.verdict == "exploding" and max(r.grad_norms) > 1e6


@pytest.mark.parametrize("activation, init", [("relu", "kaiming"), ("tanh", "xavier"),
                                              ("selu", "lecun")])
def test_matched_activation_and_init_stay_healthy(activation, init):
    """Kaiming for relu, Xavier for tanh, LeCun for selu keep every layer's gradient norm inside
    [1e-6, 1e3] and the first/last ratio inside [1e-3, 1e3] at depth 12."""
    r = verdict(activation, init)
    assert r.verdict == "healthy", r.reason
    assert all(NORM_RANGE[0] < v < NORM_RANGE[1] for v in r.grad_norms)


@pytest.mark.parametrize("arch", ["batchnorm", "residual"])
def test_batchnorm_and_residual_rescue_the_vanishing_sigmoid_net(arch):
    """The plain sigmoid + N(0, 0.01) net vanishes (first/last ~1e-22); batchnorm renormalizes
    every layer and the residual's identity path carries the gradient: both healthy."""
    r = verdict("sigmoid", "normal-0.01", arch=arch)
    assert r.verdict == "healthy", r.reason
    assert r.ratio > 1e-4


def test_residual_does_not_rescue_an_exploding_init():
    """relu + N(0, 1) with residual blocks still explodes: the identity path adds to, and cannot
    undo, a body that multiplies the signal by ~4 per block (the study's summary lists these)."""
    assert verdict("relu", "normal-1", arch="residual").verdict == "exploding"


def test_fp16_turns_the_vanishing_gradients_into_zeros_and_the_exploding_ones_into_inf():
    """In fp16 (autocast, no loss scale) the vanishing sigmoid net's first-layer gradient
    underflows to exactly 0, and the exploding relu net overflows to inf/NaN: a verdict, not a
    crash."""
    vanishing = verdict("sigmoid", "normal-0.01", precision="fp16")
    assert vanishing.verdict == "vanishing" and vanishing.grad_norms[0] == 0.0
    assert vanishing.fp16_underflow > 5
    exploding = verdict("relu", "normal-1", precision="fp16")
    assert exploding.verdict == "nonfinite" and exploding.fp16_overflow > 10


def test_dead_and_saturated_fractions_are_measured_where_they_apply():
    relu = verdict("relu", "normal-0.01")
    sigmoid = verdict("sigmoid", "normal-1")
    assert relu.dead is not None and relu.saturated is None
    assert sigmoid.saturated is not None and sigmoid.dead is None
    assert 0 <= relu.dead <= 1 and 0 < sigmoid.saturated < 1      # N(0,1): |z| ~ √32 saturates


def test_every_configuration_is_spot_checked_against_the_high_precision_reference():
    r = verdict("tanh", "xavier", depth=3, check=True)
    assert r.spot_checked is True and r.spot_check_use <= 1.0


def test_judge_thresholds():
    """The verdict rule, on hand-made profiles (see refnet/study/grid.py)."""
    assert judge([1.0, 1.0], False)[0] == "nonfinite"
    assert judge([1e-4, 1.0], True)[0] == "vanishing"            # ratio < 1e-3
    assert judge([1e4, 1.0], True)[0] == "exploding"             # ratio > 1e3
    assert judge([2e3, 1e3 * 1.5], True)[0] == "exploding"       # a norm > 1e3
    assert judge([1e-7, 1e-7], True)[0] == "vanishing"           # a norm < 1e-6
    assert judge([0.0, 0.0], True)[0] == "vanishing"             # all underflowed
    assert judge([0.5, 2.0], True)[0] == "healthy"
    assert RATIO_RANGE == (1e-3, 1e3) and NORM_RANGE == (1e-6, 1e3)


def test_sparkline_marks_zeros_and_nonfinite():
    assert sparkline([1e-3, 1e-2, 1e-1, 1.0]) == "▁▃▆█"
    assert sparkline([0.0, 1.0, None]) == "_▁!"        # one level: the bottom


def test_progress_bar_appears_only_on_runs_longer_than_the_threshold():
    import io
    stream = io.StringIO()
    bar = Reporter(stream, name="refnet study", after=1e9)
    bar.start(10, "configurations")
    for k in range(10):
        bar.update(k + 1)
    assert stream.getvalue() == ""
    bar = Reporter(stream, name="refnet study", after=0.0)
    bar.start(10, "configurations")
    for k in range(10):
        bar.update(k + 1, "label")
    assert "10/10" in stream.getvalue()


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height, len(data)


def test_study_writes_json_csv_and_real_figures(tmp_path):
    """A small grid end to end: results.json has the required keys and verdicts; with
    matplotlib, the three PNGs are valid images of plausible size."""
    configs = [Config(a, i, d, arch) for a in ("sigmoid", "relu") for i in ("normal-0.01", "kaiming")
               for d in (2, 6) for arch in ("plain", "residual")]
    results = run_study(out=tmp_path, check=False, progress=False, configs=configs)
    rows = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == len(results) == 2 * len(configs)
    for row in rows:
        assert {"activation", "init", "depth", "arch", "precision", "verdict"} <= set(row)
        assert row["verdict"] in ("vanishing", "exploding", "healthy", "nonfinite")
    assert (tmp_path / "results.csv").read_text().count("\n") == len(rows) + 1
    pytest.importorskip("matplotlib")
    for name in ("grad_norms.png", "verdicts.png", "fp16_map.png"):
        width, height, size = _png_size(tmp_path / name)
        assert width >= 300 and height >= 200 and size > 10_000, (name, width, height, size)


@pytest.mark.slow
def test_refnet_study_quick_runs_end_to_end(tmp_path, capsys):
    """The README's main job: the whole quick grid, with spot checks, prints the table and the
    summary and writes its files (timed in benchmarks/, not here)."""
    assert main(["study", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sigmoid + normal-0.01: vanishing" in out
    assert "relu + normal-1: exploding" in out
    for healthy in ("relu + kaiming: healthy", "tanh + xavier: healthy", "selu + lecun: healthy"):
        assert healthy in out
    assert ", 0 failed" in out
    rows = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == 4 * 5 * 3 * 2 * 2
    assert all(row["spot_checked"] is not False for row in rows)


def test_diagnose_preset_and_plot(tmp_path, capsys):
    """refnet presets lists the names; diagnose --preset needs no JSON; --plot writes a PNG."""
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    for name in ("sigmoid-deep", "relu-normal1", "resnet-mlp", "cnn-bn"):
        assert name in listed
    assert main(["diagnose", "--preset", "relu-normal1"]) == 1          # overflows: exit 1
    assert "forward: layer 8 (dense) output holds inf" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    png = tmp_path / "d.png"
    assert main(["diagnose", "--preset", "sigmoid-deep", "--plot", str(png)]) == 0
    assert _png_size(png)[2] > 10_000


def test_diagnose_needs_exactly_one_of_spec_and_preset(capsys):
    assert main(["diagnose"]) == 2
    assert main(["diagnose", "spec/examples/small-cnn.json", "--preset", "cnn-bn"]) == 2
    assert main(["diagnose", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
