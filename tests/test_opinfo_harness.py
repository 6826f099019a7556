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


LOSS_OPS = ("cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
            "binary_cross_entropy_with_logits")


def test_every_loss_sample_is_expressed_and_matches_torch_but_per_sample_bce_weights():
    """The loss samples — class weights (negative ones included), ignore_index, class
    probabilities, (N, C, d…) logits, reduction 'none' (a seeded upstream), pos_weight, beta,
    delta (OpInfo has no label_smoothing sample) — are all expressed and match torch to 1e-12,
    but for BCE weights with a batch axis of N > 1, which refnet takes as a model option over
    one sample and names as the reason."""
    results = opinfo_coverage.measure(set(LOSS_OPS))
    for label in LOSS_OPS:
        r = results[label]
        assert r["samples"] > 0 and r["matched"] == r["expressible"], (label, r)
        reasons = set(r["inexpressible"])
        if label == "binary_cross_entropy_with_logits":
            assert all("a weight with a batch axis" in k for k in reasons), reasons
        else:
            assert r["expressible"] == r["samples"], (label, reasons)


def test_a_weighted_mean_over_the_count_shows_up_as_cross_entropy_mismatches(monkeypatch):
    """The weighted mean divided by the number of labels instead of Σ w[y]: the cross-entropy
    samples with class weights and reduction 'mean' no longer match, the others still do."""
    from refnet.losses import _ClassLoss

    def count(self, bk, y, z):
        labels, kept = self._labels(y)
        return labels.size if kept is None else int(kept.sum())
    monkeypatch.setattr(_ClassLoss, "_mean_divisor", count)
    r = opinfo_coverage.measure({"cross_entropy"})["cross_entropy"]
    assert r["expressible"] == r["samples"] and 0 < r["samples"] - r["matched"] < r["samples"]
