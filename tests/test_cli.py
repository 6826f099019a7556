"""The command line: refnet verify / grads; exit 0 pass, 1 fail, 2 bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refnet import FLOAT32, FLOAT64, Model, MPBackend
from refnet.cli import main
from refnet.layers.activations import ACTIVATIONS

ROOT = Path(__file__).resolve().parent.parent


def test_verify_prints_a_table_and_exits_0_when_every_check_passes(spec_file, capsys):
    assert main(["verify", str(spec_file)]) == 0
    out = capsys.readouterr().out
    assert "0.weight" in out and "PASSED" in out and "FD digits" in out


def test_verify_json_has_passed_and_per_tensor_fields(spec_file, capsys):
    assert main(["verify", str(spec_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True
    names = [t["name"] for t in report["tensors"]]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "x"]
    for t in report["tensors"]:
        assert {"name", "max_ulp", "max_rel_err", "fd_digits"} <= set(t)


def test_verify_exits_1_when_a_check_fails(spec_file, capsys, monkeypatch):
    tanh = ACTIVATIONS["tanh"]
    monkeypatch.setattr(tanh, "df", lambda self, bk, z, saved: 1 - bk.tanh(z))   # wrong formula
    assert main(["verify", str(spec_file)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_verify_with_params_and_data_files(spec_file, tmp_path, capsys):
    model = Model.load(spec_file)
    params = model.init_params(np.random.default_rng(9))
    np.savez(tmp_path / "p.npz", **params)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((2, 3)), y=np.array([0, 2]))
    code = main(["verify", str(spec_file), "--params", str(tmp_path / "p.npz"),
                 "--data", str(tmp_path / "d.npz"), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tensors"][-1]["shape"] == [2, 3]


@pytest.mark.parametrize("precision", ["float64", "float32", "mp"])
def test_grads_writes_loss_input_and_every_parameter_gradient(spec_file, tmp_path, precision,
                                                                capsys):
    out = tmp_path / "g.npz"
    assert main(["grads", str(spec_file), "--precision", precision, "--out", str(out)]) == 0
    with np.load(out, allow_pickle=False) as g:
        keys = set(g.files)
        model = Model.load(spec_file)
        assert keys == {"loss", "grad/x"} | {f"grad/{k}" for k in model.param_shapes()}
        params, x, y = model.prepare()
        bk = {"float64": FLOAT64, "float32": FLOAT32, "mp": MPBackend(50)}[precision]
        ref = model.loss_and_grads(bk, params, x, y)
        assert np.array_equal(g["grad/0.weight"], bk.to_numpy(ref.params["0.weight"]))
        assert g["grad/x"].dtype == (np.float32 if precision == "float32" else np.float64)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", ["unknown layer", "bad json", "missing file", "wrong param shape",
                                  "nan input", "label out of range", "pickled data"])
def test_bad_input_prints_the_error_and_exits_2(case, spec_file, tmp_path, capsys):
    args = ["verify", str(spec_file)]
    if case == "unknown layer":
        args[1] = _write(tmp_path, "s.json", json.dumps(
            {"input_shape": [3], "layers": [{"type": "swish"}], "loss": {"type": "mse"}}))
        expect = "unknown layer type 'swish'"
    elif case == "bad json":
        args[1] = _write(tmp_path, "s.json", "{not json")
        expect = "not valid JSON"
    elif case == "missing file":
        args += ["--params", str(tmp_path / "nope.npz")]
        expect = "no such file"
    elif case == "wrong param shape":
        params = Model.load(spec_file).init_params()
        params["0.weight"] = params["0.weight"].T
        np.savez(tmp_path / "p.npz", **params)
        args += ["--params", str(tmp_path / "p.npz")]
        expect = "0.weight"
    elif case == "nan input":
        np.savez(tmp_path / "d.npz", x=np.array([[0.0, np.nan, 1.0]]), y=np.array([0]))
        args += ["--data", str(tmp_path / "d.npz")]
        expect = "finite"
    elif case == "label out of range":
        np.savez(tmp_path / "d.npz", x=np.zeros((1, 3)), y=np.array([5]))
        args += ["--data", str(tmp_path / "d.npz")]
        expect = "labels must lie in [0, 2]"
    else:
        np.savez(tmp_path / "d.npz", x=np.array([{"evil": 1}], dtype=object), y=np.array([0]))
        args += ["--data", str(tmp_path / "d.npz")]
        expect = "not a readable .npz"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error" in err and expect in err


def test_python_dash_m_refnet_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "refnet", "--version"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("refnet ")


@pytest.mark.parametrize("steps", [45, 40, 3])
def test_train_table_shows_each_sampled_step_once_and_always_the_last(spec_file, capsys, steps):
    """The text table samples about 20 steps and ends on the last one, never printing a step twice
    (45 steps sample every 2nd: 0, 2, …, 44 — the last is already among them)."""
    assert main(["train", str(spec_file), "--steps", str(steps), "--lr", "0.01"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:-1]]
    assert len(rows) == len(set(rows)), f"a step printed twice: {rows}"
    assert rows[-1] == str(steps - 1), f"the table should end on step {steps - 1}: {rows}"
