"""Golden vectors: the committed set recomputes exactly, catches a changed formula, loads without
pickle, and PyTorch conforms to it in float64 and float32."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import HAVE_TORCH
from refnet.cli import main
from refnet.interop.vectors import Fraction, check, load, round_exact

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"


def test_the_committed_vectors_recompute_without_drift():
    assert check(VECTORS) == []
    assert sum(p.stat().st_size for p in VECTORS.glob("*.json")) < 5_000_000
    assert len(list(VECTORS.glob("*.json"))) >= 20


def test_changing_one_backward_formula_makes_the_check_fail(monkeypatch, tmp_path):
    """tanh' = 4E/(1+E)² changed in its 13th digit: the tanh vector and the MLP drift."""
    from refnet.layers.activations import Tanh
    original = Tanh.df
    monkeypatch.setattr(Tanh, "df", lambda self, bk, z, s: original(self, bk, z, s) * (1 + 1e-12))
    for name in ("tanh.json", "net-mlp.json"):
        shutil.copy(VECTORS / name, tmp_path / name)
    problems = check(tmp_path)
    assert any(p.startswith("tanh.json: grads/x value") for p in problems)
    assert any(p.startswith("net-mlp.json") for p in problems)
    assert main(["vectors", "check", str(tmp_path)]) == 1


def test_vectors_hold_the_exact_value_rounded_once_to_each_format():
    """The stored float32/fp16 values are the 30-digit values rounded once (ties to even,
    fp16 overflow to inf), and the inputs are exact hex floats."""
    record = load(VECTORS / "conv2d.json")
    for ref in record["grads"].values():
        for text, h64, h32, h16 in zip(ref["value"], ref["float64"], ref["float32"], ref["fp16"]):
            exact = Fraction(text)       # 30 digits: never this close to a tie of these formats
            assert float.fromhex(h64) == round_exact(exact, "float64")
            assert float.fromhex(h32) == round_exact(exact, "float32")
            assert float.fromhex(h16) == round_exact(exact, "fp16")
    assert round_exact(Fraction(65520), "fp16") == float("inf")
    assert round_exact(Fraction(65519), "fp16") == 65504.0
    assert round_exact(Fraction(2049), "fp16") == 2048.0                  # tie to even
    assert round_exact(Fraction(3, 2 ** 26), "fp16") == 2.0 ** -24        # subnormal
    x = record["inputs"]["x"]
    assert all(isinstance(h, str) and h.startswith(("0x", "-0x")) for h in x["hex"])


def test_kinks_are_flagged_where_the_inputs_sit_on_them():
    relu = load(VECTORS / "relu.json")
    x = [float.fromhex(h) for h in relu["inputs"]["x"]["hex"]]
    assert relu["grads"]["x"]["kink"] == [v == 0.0 for v in x]
    pool = load(VECTORS / "maxpool2d.json")
    assert sum(pool["grads"]["x"]["kink"]) == 4                            # the tied window


def test_loading_never_unpickles_and_rejects_foreign_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="refnet-vectors/1"):
        load(bad)
    assert main(["vectors", "check", str(tmp_path / "empty")]) == 2


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_conforms_to_every_vector(dtype, capsys):
    assert main(["conformance", "--framework", "torch", "--dtype", dtype, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and len(report["vectors"]) >= 20
    worst = max(t["max_ulps"] for v in report["vectors"] for t in v["tensors"]
                if "0.bias" not in t["name"] or "cnn" not in v["name"])
    assert 0 < worst < 1e5             # measured: ≤ 668 ulps in float64 (an MLP weight gradient)


def test_conformance_without_a_known_framework_is_a_clear_error(capsys):
    assert main(["conformance", "--framework", "jax"]) == 2
    assert "unknown framework" in capsys.readouterr().err
