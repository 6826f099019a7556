"""Values, not only counts (issue 19, item 3): ``refnet grads --precision fp16|bf16 --out``
writes the emulated gradients, and ``refnet diagnose --compare THEIRS.npz`` holds them against a
GPU run's, per tensor: the fraction equal, the largest difference in ulps of the format, where
they first differ. ``refnet capture`` (torch) writes THEIRS.npz.

The comparison is tested against planted differences of one and of five units in the last
place (the smallest a GPU value can differ by, and a larger one beside it), and against the
emulation's own file, which must compare bit for bit."""

import importlib
import json

import numpy as np
import pytest
from conftest import HAVE_TORCH, run_cli, small_spec

from refnet.lowp.diagnose import compare_tensor
from refnet.lowp.emulation import Precision, run
from refnet.model import Model
from refnet.numerics.formats import FLOAT32, ordinal, round_to

SPEC = "spec/examples/small-cnn.json"
SCALE = 256.0




@pytest.fixture
def grads_file(tmp_path, capsys):
    """The emulation's own gradients of the small CNN under half, S = 2⁸, as grads writes them."""
    path = tmp_path / "g.npz"
    code, out, err = run_cli(["grads", SPEC, "--precision", "fp16", "--policy", "half",
                          "--loss-scale", str(SCALE), "--out", str(path)], capsys)
    assert code == 0 and err == "", err
    return path


def test_grads_writes_the_emulated_gradients_unscaled_by_torch_name(grads_file):
    """Every parameter's gradient (``grad/<torch name>``) and ``grad/x`` are the emulation's
    unscaled gradients bit for bit, as float32; times S = 2⁸ each is a value of fp16 (the format
    it was stored in, ``dtype/<name>``): nothing was lost in writing."""
    model = Model.load(SPEC)
    params, x, y = model.prepare()
    r = run(model, Precision("fp16", "half"), params, x, y, loss_scale=SCALE)
    with np.load(grads_file, allow_pickle=False) as f:
        files = set(f.files)
        assert {f"grad/{model.torch_name(k)}" for k in r.grads} | {"grad/x"} <= files
        assert float(f["loss_scale"]) == SCALE and str(f["precision"]) == "fp16"
        for name, g in r.grads.items():
            written = f[f"grad/{model.torch_name(name)}"]
            assert written.dtype == np.float32
            np.testing.assert_array_equal(written, g)
            assert str(f[f"dtype/{model.torch_name(name)}"]) == "float16"
            scaled = written.astype(np.float64) * SCALE
            np.testing.assert_array_equal(round_to(scaled, "fp16"), scaled)
        np.testing.assert_array_equal(f["grad/x"], r.x_grad)


def compare_json(argv, capsys):
    code, out, err = run_cli(argv + ["--json"], capsys)
    assert err == "", err
    return code, {c["name"]: c for c in json.loads(out)["compare"]}


def test_the_emulations_own_gradients_compare_bit_for_bit(grads_file, capsys):
    """diagnose --compare on grads' own file (``grad/`` names and its settings' keys read as
    they are): every tensor 100 % equal, 0 ulps, no first difference; x included."""
    code, rows = compare_json(["diagnose", SPEC, "--precision", "fp16", "--policy", "half",
                               "--loss-scale", str(SCALE), "--compare", str(grads_file)], capsys)
    assert code == 0
    model = Model.load(SPEC)
    assert set(rows) == {model.torch_name(k) for k in model.param_shapes()} | {"x"}
    for c in rows.values():
        assert c["equal_fraction"] == 1.0 and c["max_ulps"] == 0 and c["first_difference"] is None


def _step(value, k, scale=SCALE):
    """``value`` (unscaled) whose scaled value moved by k fp16 values in magnitude (k > 0
    away from zero): k added to its fp16 bit pattern."""
    bits = np.array(np.float16(np.float64(value) * scale)).view(np.uint16)
    moved = np.array(bits + np.uint16(k % 2 ** 16), dtype=np.uint16).view(np.float16)
    return np.float32(np.float64(moved) / scale)


def test_a_planted_one_ulp_difference_is_counted_at_its_index(grads_file, tmp_path, capsys):
    """Change one element of 3.weight by one fp16 step (at the scaled value) and one of
    10.weight by five: the comparison reports those tensors as (n − 1)/n equal, 1 and 5 ulps,
    first different at exactly the changed indices; every other tensor stays 100 %."""
    with np.load(grads_file, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    w3 = arrays["grad/3.weight"].copy()
    i3 = (1, 0, 2, 1)
    assert w3[i3] != 0
    w3[i3] = _step(w3[i3], 1)
    w10 = arrays["grad/10.weight"].copy()
    i10 = (4, 3)
    w10[i10] = _step(w10[i10], -5)
    arrays.update({"grad/3.weight": w3, "grad/10.weight": w10})
    theirs = tmp_path / "theirs.npz"
    np.savez(theirs, **arrays)
    code, rows = compare_json(["diagnose", SPEC, "--precision", "fp16", "--policy", "half",
                               "--loss-scale", str(SCALE), "--compare", str(theirs)], capsys)
    for name, index, ulps in (("3.weight", i3, 1), ("10.weight", i10, 5)):
        c = rows[name]
        assert c["equal"] == c["numel"] - 1 and c["max_ulps"] == ulps
        assert c["first_difference"]["index"] == list(index)
        assert c["first_difference"]["ulps"] == ulps
    assert all(c["equal_fraction"] == 1.0 for n, c in rows.items()
               if n not in ("3.weight", "10.weight"))


def test_ulps_are_counted_across_binades_and_subnormals_and_signs():
    """The distance is the number of format values between the two (``ordinal``): 1 from the
    largest subnormal to the smallest normal, 2 across zero between ±2⁻²⁴, and in float32 steps
    for a float32 tensor; inf against a finite value is a non-finite mismatch, NaN equals NaN."""
    tiny = 2.0 ** -14
    assert ordinal(tiny, "fp16") - ordinal(tiny - 2.0 ** -24, "fp16") == 1
    assert ordinal(2.0 ** -24, "fp16") - ordinal(-(2.0 ** -24), "fp16") == 2
    assert ordinal(1.0 + 2.0 ** -23, FLOAT32) - ordinal(1.0, FLOAT32) == 1
    c = compare_tensor("t", np.array([1.0, np.nan, 3.0]), np.array([1.0, np.nan, np.inf]),
                       "float16", 1.0)
    assert c.equal == 2 and c.nonfinite_mismatch == 1 and c.max_ulps == 0
    c = compare_tensor("t", np.array([2.0 ** -14]), np.array([-(2.0 ** -24)]), "float16", 1.0)
    assert c.max_ulps == 1024 + 1


BAD = {
    "missing name": (lambda a: a.pop("grad/3.weight"), "missing", "3.weight"),
    "unknown name": (lambda a: a.update({"fc.weight": np.zeros(3)}), "unknown", "fc.weight"),
    "wrong shape": (lambda a: a.update({"grad/10.weight": np.zeros((5, 7), np.float32)}),
                    "10.weight", "shape (5, 6)", "(5, 7)"),
    "integer dtype": (lambda a: a.update({"grad/10.bias": np.zeros(5, np.int64)}),
                      "10.bias", "float16, float32 or float64", "int64"),
    "x of another batch": (lambda a: a.update({"grad/x": np.zeros((3, 3, 8, 8), np.float32)}),
                           "x must have shape (4, 3, 8, 8)", "(3, 3, 8, 8)"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_compare_file_is_one_line_naming_it(case, grads_file, tmp_path, capsys,
                                                  monkeypatch):
    """Missing or unknown names, a wrong shape, a dtype that is no float, an input gradient of
    another batch: exit 2, one line naming the file and the tensor, before any work (the
    emulation is never run)."""
    change, *needles = BAD[case]
    with np.load(grads_file, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    change(arrays)
    theirs = tmp_path / "bad.npz"
    np.savez(theirs, **arrays)

    def no_work(*a, **k):
        raise AssertionError("the work started")
    monkeypatch.setattr(importlib.import_module("refnet.lowp.diagnose"), "diagnose", no_work)
    code, out, err = run_cli(["diagnose", SPEC, "--precision", "fp16", "--policy", "half",
                          "--compare", str(theirs)], capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    for needle in (f"--compare {theirs}", *needles):
        assert needle in err, (needle, err)


def test_a_compare_file_that_needs_unpickling_is_refused(tmp_path, capsys):
    """An object array (which only pickle could load) is refused, never unpickled."""
    theirs = tmp_path / "obj.npz"
    np.savez(theirs, **{"0.weight": np.array([{"a": 1}], dtype=object)})
    code, out, err = run_cli(["diagnose", SPEC, "--compare", str(theirs)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "--compare" in err, err


@pytest.mark.parametrize("argv,needle", [
    (["diagnose", "m.json", "--precision", "float64", "--compare", "t.npz"], "--compare"),
    (["diagnose", "m.json", "--loss-scale", "dynamic", "--compare", "t.npz"], "static"),
    (["diagnose", "m.json", "--precision", "float32", "--loss-dtype", "float32"], "--loss-dtype"),
    (["grads", "m.json", "--policy", "half", "--out", "g.npz"], "--policy"),
    (["grads", "m.json", "--precision", "mp", "--loss-scale", "8", "--out", "g.npz"],
     "--loss-scale"),
    (["grads", "m.json", "--precision", "fp16", "--loss-scale", "dynamic", "--out", "g.npz"],
     "static"),
    (["train", "m.json", "--steps", "1", "--lr", "0.1", "--loss-dtype", "float32"],
     "--loss-dtype")])
def test_emulation_options_without_an_emulated_precision_are_refused(argv, needle, tmp_path,
                                                                    capsys, monkeypatch):
    """--compare, --loss-dtype, --policy and a loss scale mean nothing for a float backend, and
    grads/compare take a static scale: exit 2, one line naming the option."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.json").write_text(json.dumps(small_spec("tanh", "softmax_cross_entropy")))
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "g.npz").exists()


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("policy,loss_dtype", [("half", "policy"), ("autocast", "float32")])
def test_capture_writes_every_gradient_that_compare_reads(policy, loss_dtype, tmp_path,
                                                          capsys):
    """``refnet capture`` (here on torch's CPU kernels, which are not CUDA's: no equality is
    claimed) writes every parameter's unscaled gradient by torch name and x, float32, in the
    model's shapes, and diagnose --compare reads the file with exit 0."""
    out = tmp_path / "theirs.npz"
    code, _, err = run_cli(["capture", SPEC, "--precision", "fp16", "--policy", policy,
                        "--loss-dtype", loss_dtype, "--loss-scale", "8", "--device", "cpu",
                        "--out", str(out)], capsys)
    assert code == 0 and err == "", err
    model = Model.load(SPEC)
    with np.load(out, allow_pickle=False) as f:
        assert set(f.files) == {model.torch_name(k) for k in model.param_shapes()} | {"x"}
        for name, shape in model.param_shapes().items():
            assert f[model.torch_name(name)].shape == shape
            assert f[model.torch_name(name)].dtype == np.float32
    code, rows = compare_json(["diagnose", SPEC, "--precision", "fp16", "--policy", policy,
                               "--loss-dtype", loss_dtype, "--loss-scale", "8", "--compare",
                               str(out)], capsys)
    assert code == 0 and set(rows) == set(model.torch_name(k) for k in model.param_shapes()
                                          ) | {"x"}


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_capture_refuses_dropout_in_train_mode(tmp_path, capsys):
    """A GPU run draws its own dropout masks: no value could be compared, so capture refuses,
    naming the layer (and writes nothing)."""
    spec = small_spec("tanh", "softmax_cross_entropy")
    spec["layers"].insert(2, {"type": "dropout", "p": 0.2})
    (tmp_path / "d.json").write_text(json.dumps(spec))
    out = tmp_path / "t.npz"
    code, _, err = run_cli(["capture", str(tmp_path / "d.json"), "--device", "cpu", "--out",
                        str(out)], capsys)
    assert code == 2 and "dropout" in err and len(err.splitlines()) == 1 and not out.exists()
