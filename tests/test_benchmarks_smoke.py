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
