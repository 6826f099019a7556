"""The benchmark bodies run (once each, untimed) so that they cannot rot."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_every_benchmark_body_runs_once():
    pytest.importorskip("pytest_benchmark")
    result = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q",
                             "--benchmark-disable", "-p", "no:cacheprovider"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_compare_prints_refnet_over_torch_ratios(tmp_path):
    import json
    run = {"benchmarks": [
        {"group": "mlp", "params": {"impl": "refnet"}, "stats": {"mean": 3.0}, "extra_info": {}},
        {"group": "mlp", "params": {"impl": "torch"}, "stats": {"mean": 2.0}, "extra_info": {}},
        {"group": "mp-gradient-x", "params": {}, "stats": {"mean": 1.0},
         "extra_info": {"ratio_to_float64": 40.0}}]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), str(path),
                          "--json"], capture_output=True, text=True)
    assert json.loads(out.stdout) == {"mlp": 1.5, "mp-gradient-x": 40.0}


def test_compare_gives_a_gemm_floor_group_refnet_over_the_floor_and_floor_over_torch(tmp_path):
    """A gemm-floor-G group is reported as refnet's time in G over the floor's (here 3/2.4 =
    1.25), and the text adds floor/torch (2.4/2 = 1.2); a floor without its refnet group has
    no ratio."""
    import json
    run = {"benchmarks": [
        {"group": "mlp", "params": {"impl": "refnet"}, "stats": {"mean": 3.0}, "extra_info": {}},
        {"group": "mlp", "params": {"impl": "torch"}, "stats": {"mean": 2.0}, "extra_info": {}},
        {"group": "gemm-floor-mlp", "params": {}, "stats": {"mean": 2.4}, "extra_info": {}},
        {"group": "gemm-floor-conv", "params": {}, "stats": {"mean": 1.0}, "extra_info": {}}]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    compare = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), str(path)]
    out = subprocess.run(compare + ["--json"], capture_output=True, text=True)
    assert json.loads(out.stdout) == {"gemm-floor-mlp": 1.25, "mlp": 1.5}
    text = subprocess.run(compare, capture_output=True, text=True).stdout
    assert "gemm-floor-mlp" in text and "(refnet/floor); floor/torch 1.2" in text


def test_compare_stat_median_compares_the_medians_not_the_means(tmp_path):
    """--stat median: a peer's one slow round (mean 5, median 2) no longer halves the ratio."""
    import json
    run = {"benchmarks": [
        {"group": "bn", "params": {"impl": "refnet"}, "stats": {"mean": 3.0, "median": 3.0},
         "extra_info": {}},
        {"group": "bn", "params": {"impl": "torch"}, "stats": {"mean": 5.0, "median": 2.0},
         "extra_info": {}}]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    compare = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), str(path), "--json"]
    assert json.loads(subprocess.run(compare, capture_output=True, text=True).stdout) == {"bn": 0.6}
    median = subprocess.run(compare + ["--stat", "median"], capture_output=True, text=True)
    assert json.loads(median.stdout) == {"bn": 1.5}


def test_compare_prints_the_paired_ratios_beside_the_ratio_of_means(tmp_path):
    """A refnet benchmark's paired_ratio_to_torch (a floor's paired_refnet_over_floor, an
    emulation's paired_ratio_to_float32) is printed on its group's line, named as the ratio it
    is; --json keeps the ratios of means."""
    import json
    run = {"benchmarks": [
        {"group": "mlp", "params": {"impl": "refnet"}, "stats": {"mean": 3.0},
         "extra_info": {"paired_ratio_to_torch": 1.1}},
        {"group": "mlp", "params": {"impl": "torch"}, "stats": {"mean": 2.0}, "extra_info": {}},
        {"group": "gemm-floor-mlp", "params": {}, "stats": {"mean": 2.4},
         "extra_info": {"paired_refnet_over_floor": 1.05}},
        {"group": "emulation-fp16-autocast-mlp", "params": {}, "stats": {"mean": 9.0},
         "extra_info": {"ratio_to_float32": 3.2, "paired_ratio_to_float32": 2.1}}]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    compare = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), str(path)]
    lines = subprocess.run(compare, capture_output=True, text=True).stdout.splitlines()
    mlp = next(line for line in lines if line.startswith("mlp "))
    floor = next(line for line in lines if line.startswith("gemm-floor-mlp "))
    assert "1.5  (refnet/torch); refnet/torch 1.1 in interleaved pairs" in mlp
    assert "refnet/floor 1.05 in interleaved pairs" in floor
    emulated = next(line for line in lines if line.startswith("emulation-"))
    assert "3.2  (emulated/float32); emulated/float32 2.1 in interleaved pairs" in emulated
    out = subprocess.run(compare + ["--json"], capture_output=True, text=True)
    assert json.loads(out.stdout) == {"emulation-fp16-autocast-mlp": 3.2, "gemm-floor-mlp": 1.25,
                                      "mlp": 1.5}


def test_paired_ratio_is_the_median_of_per_pair_ratios_with_alternating_order(monkeypatch):
    """benchmarks' paired_ratio on a fake clock: our call costs 3 ticks, the peer's 2, except
    that one pair's peer block is slowed 10x (a noisy neighbour) — the median of the pairs'
    ratios is still exactly 1.5, where the ratio of the two sides' total times is not; the
    order of the two blocks alternates from pair to pair."""
    import time
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import test_bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    clock, calls = [0.0], []

    def ours():
        clock[0] += 3.0
        calls.append("ours")

    def peer():
        slowed = calls.count("peer") == 4          # the third pair's peer block
        clock[0] += 20.0 if slowed else 2.0
        calls.append("peer")
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(test_bench, "PAIR_BLOCK_SECONDS", 3.0)   # one call a block, each side
    monkeypatch.setattr(test_bench, "PAIR_SETTLE_SECONDS", 0.0)
    assert test_bench.paired_ratio(ours, peer, pairs=7) == 1.5
    pairs = calls[4:]                  # after the warm-up and the calibration call of each side
    assert len(pairs) == 14 and sum(c == "peer" for c in pairs) == 7
    assert [pairs[2 * k] for k in range(7)] == ["ours", "peer"] * 3 + ["ours"]
    ours_total = 3.0 * 7
    peer_total = 2.0 * 6 + 20.0
    assert ours_total / peer_total != 1.5
