"""benchmarks/opinfo_coverage.py, the OpInfo measurement, runs and can fail (torch and expecttest
only; the measurement itself is in spec/opinfo.md)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("expecttest")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import opinfo_coverage  # noqa: E402

pytestmark = pytest.mark.torch


def test_every_adaptive_pool_and_dropout_sample_is_expressed_and_matches_torch():
    results = opinfo_coverage.measure({"adaptive_avg_pool2d", "adaptive_max_pool2d", "dropout"})
    for label in ("adaptive_avg_pool2d", "adaptive_max_pool2d", "dropout"):
        r = results[label]
        assert r["samples"] > 0 and r["expressible"] == r["samples"] == r["matched"], (label, r)


def test_a_wrong_divisor_shows_up_as_mismatches(monkeypatch):
    """Adaptive average pooling dividing by one more than the window's size: every sample is
    still expressible, and none matches."""
    from refnet.layers.pool import AdaptiveAvgPool2d
    monkeypatch.setattr(AdaptiveAvgPool2d, "divisors", lambda self: self.windows.count + 1)
    r = opinfo_coverage.measure({"adaptive_avg_pool2d"})["adaptive_avg_pool2d"]
    assert r["expressible"] == r["samples"] > 0 and r["matched"] == 0
