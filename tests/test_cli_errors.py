"""Bad input on the command line: exit 2 and ONE line on stderr naming the option or file, what
was expected and what was found; no traceback, no warning; checked before any work starts, and
nothing written.

Every case runs ``refnet.cli.main`` in a fresh directory that is the working directory, and the
directory's whole tree is compared before and after: a file written anywhere under it (numpy's
``DIR.npz`` beside a directory, matplotlib's ``NAME.png``) fails the case. Where the claim is that
the work never started, the work itself is replaced by a function that fails the test.
Range limits are tested at the bound: the limit itself is accepted, the next value refused.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, small_spec

from refnet import Model
from refnet.cli import MAX_DPS, MAX_PREC, MIN_DPS, MIN_PREC

ROOT = Path(__file__).resolve().parent.parent


def _tree(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """A fresh working directory holding a small MLP spec (m.json) and a BatchNorm one (bn.json)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.json").write_text(json.dumps(small_spec("tanh", widths=(4,))))
    bn = small_spec("tanh", widths=(4,))
    bn["layers"].insert(1, {"type": "batchnorm"})
    (tmp_path / "bn.json").write_text(json.dumps(bn))
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile.txt").write_text("not a directory\n")
    return tmp_path




def assert_bad_input(argv, capsys, root, *needles):
    """Exit 2; stderr one line holding every needle; nothing on stdout; no file written."""
    before = _tree(root)
    code, out, err = run_cli(argv, capsys)
    lines = err.splitlines()
    assert code == 2, f"expected exit 2, got {code}; stderr {err!r}"
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    for needle in needles:
        assert needle in lines[0], f"expected {needle!r} in {lines[0]!r}"
    assert "Traceback" not in err and "Warning" not in err
    assert out == "", f"expected nothing on stdout, got {out!r}"
    assert _tree(root) == before, f"files written: {sorted(set(_tree(root)) - set(before))}"
    return lines[0]


def assert_accepted(argv, capsys):
    """Not bad input: exit 0 or 1 (a check may fail), and nothing at all on stderr."""
    code, out, err = run_cli(argv, capsys)
    assert code in (0, 1), f"expected exit 0 or 1, got {code}; stderr {err!r}"
    assert err == "", f"expected an empty stderr, got {err!r}"


# --- numeric options out of range -------------------------------------------------------------

OUT_OF_RANGE = {
    # verify --directions 0 used to run 0 finite-difference checks and print PASSED.
    "directions 0": (["verify", "m.json", "--directions", "0"], "--directions", ">= 1", "got 0"),
    "dps above the limit": (["verify", "m.json", "--dps", str(MAX_DPS + 1)], "--dps",
                            f"[{MIN_DPS}, {MAX_DPS}]", f"got {MAX_DPS + 1}"),
    "dps below the floor": (["verify", "m.json", "--dps", str(MIN_DPS - 1)], "--dps",
                            f"got {MIN_DPS - 1}"),
    "grads dps above the limit": (["grads", "m.json", "--precision", "mp", "--dps", "100000",
                                   "--out", "g.npz"], "--dps", f"[{MIN_DPS}, {MAX_DPS}]"),
    # --certify --prec 1000000 never ended.
    "prec above the limit": (["verify", "m.json", "--certify", "--prec", str(MAX_PREC + 1)],
                             "--prec", f"[{MIN_PREC}, {MAX_PREC}]", f"got {MAX_PREC + 1}"),
    "prec below the floor": (["verify", "m.json", "--certify", "--prec", str(MIN_PREC - 1)],
                             "--prec", f"got {MIN_PREC - 1}"),
    "digits negative": (["verify", "m.json", "--digits", "-5"], "--digits", "(0, 30]", "-5"),
    "digits zero": (["verify", "m.json", "--digits", "0"], "--digits", "(0, 30]"),
    "digits above what FD delivers": (["verify", "m.json", "--digits", "30.001"], "--digits",
                                      "30 digits"),
    "digits nan": (["verify", "m.json", "--digits", "nan"], "--digits", "nan"),
    "digits equal to dps": (["verify", "m.json", "--dps", "20", "--digits", "20"],
                            "--digits 20", "below --dps 20"),
    "seed negative": (["verify", "m.json", "--seed", "-1"], "--seed", ">= 0", "got -1"),
    "steps zero": (["train", "m.json", "--steps", "0", "--lr", "0.1"], "--steps", "got 0"),
    "lr nan": (["train", "m.json", "--steps", "1", "--lr", "nan"], "--lr", "nan"),
    "lr zero": (["train", "m.json", "--steps", "1", "--lr", "0"], "--lr", "> 0"),
    "momentum 1": (["train", "m.json", "--steps", "1", "--lr", "0.1", "--momentum", "1"],
                   "--momentum", "[0, 1)"),
    "momentum negative": (["train", "m.json", "--steps", "1", "--lr", "0.1", "--momentum",
                           "-0.1"], "--momentum"),
    "clip-norm zero": (["train", "m.json", "--steps", "1", "--lr", "0.1", "--clip-norm", "0"],
                       "--clip-norm", "> 0"),
    "clip-value inf": (["train", "m.json", "--steps", "1", "--lr", "0.1", "--clip-value", "inf"],
                       "--clip-value", "inf"),
    "l1 negative": (["train", "m.json", "--steps", "1", "--lr", "0.1", "--l1", "-0.5"], "--l1",
                    ">= 0"),
    "l2 nan": (["train", "m.json", "--steps", "1", "--lr", "0.1", "--l2", "nan"], "--l2"),
    "diagnose lr nan": (["diagnose", "m.json", "--lr", "nan"], "--lr", "nan"),
    # 1e300 leaked numpy's "overflow encountered in cast" (float32(1e300) = inf).
    "loss scale 1e300": (["diagnose", "m.json", "--loss-scale", "1e300"], "--loss-scale",
                         "2^126", "1e300"),
    "loss scale just above 2^126": (["diagnose", "m.json", "--loss-scale",
                                     repr(float(np.nextafter(2.0 ** 126, np.inf)))],
                                    "--loss-scale", "2^126"),
    "loss scale just below 2^-126": (["train", "m.json", "--steps", "1", "--lr", "0.1",
                                      "--precision", "fp16", "--loss-scale",
                                      repr(float(np.nextafter(2.0 ** -126, 0)))],
                                     "--loss-scale", "2^-126"),
    "not an integer": (["verify", "m.json", "--directions", "two"], "--directions", "'two'"),
}


@pytest.mark.parametrize("case", OUT_OF_RANGE)
def test_an_option_out_of_its_range_is_one_line_naming_it(case, cwd, capsys):
    """Each numeric option out of its documented range (refnet.cli's limits) exits 2 with one
    line naming the option, the range and the value found."""
    argv, *needles = OUT_OF_RANGE[case]
    assert_bad_input(argv, capsys, cwd, *needles)


AT_THE_BOUND = {
    "dps at the limit": ["verify", "m.json", "--dps", str(MAX_DPS), "--mode", "direction",
                         "--directions", "1", "--json"],
    "dps at the floor, digits just below it": ["verify", "m.json", "--dps", str(MIN_DPS),
                                               "--digits", "15.9", "--json"],
    "digits at the FD limit": ["verify", "m.json", "--digits", "30", "--json"],
    "prec at the limit": ["verify", "m.json", "--certify", "--prec", str(MAX_PREC), "--json"],
    "prec at the floor": ["verify", "m.json", "--certify", "--prec", str(MIN_PREC), "--json"],
    "one direction, seed 0": ["verify", "m.json", "--mode", "direction", "--directions", "1",
                              "--seed", "0", "--json"],
    "loss scale 2^126": ["diagnose", "m.json", "--loss-scale", repr(2.0 ** 126), "--json"],
    "loss scale 2^-126": ["diagnose", "m.json", "--loss-scale", repr(2.0 ** -126), "--json"],
    "momentum just below 1": ["train", "m.json", "--steps", "1", "--lr", "0.1", "--momentum",
                              "0.999", "--json"],
}


@pytest.mark.parametrize("case", AT_THE_BOUND)
def test_an_option_at_its_bound_is_accepted_without_a_warning(case, cwd, capsys):
    """The limits are inclusive where documented so: the bound itself runs (exit 0 or 1), with
    nothing on stderr — in particular no numpy warning at the largest loss scale."""
    assert_accepted(AT_THE_BOUND[case], capsys)


# --- options the others make meaningless ------------------------------------------------------

IGNORED = {
    "train policy with float32": (["train", "m.json", "--steps", "1", "--lr", "0.1",
                                   "--precision", "float32", "--policy", "half"], "--policy",
                                  "float32"),
    "train policy with float64": (["train", "m.json", "--steps", "1", "--lr", "0.1",
                                   "--policy", "autocast"], "--policy", "float64"),
    "train loss scale with float32": (["train", "m.json", "--steps", "1", "--lr", "0.1",
                                       "--precision", "float32", "--loss-scale", "8"],
                                      "--loss-scale", "float32"),
    "train momentum with adam": (["train", "m.json", "--steps", "1", "--lr", "0.1",
                                  "--optimizer", "adam", "--momentum", "0.9"], "--momentum",
                                 "sgd"),
    "diagnose policy with float64": (["diagnose", "m.json", "--precision", "float64",
                                      "--policy", "half"], "--policy", "float64"),
    "diagnose accumulate with float32": (["diagnose", "m.json", "--precision", "float32",
                                          "--accumulate", "storage"], "--accumulate", "float32"),
    "diagnose has no dps": (["diagnose", "m.json", "--dps", "30"], "--dps"),
    "verify certify with dps": (["verify", "m.json", "--certify", "--dps", "60"], "--dps",
                                "--certify"),
    "verify certify with digits": (["verify", "m.json", "--certify", "--digits", "10"],
                                   "--digits", "--certify"),
    "verify prec without certify": (["verify", "m.json", "--prec", "200"], "--prec",
                                    "--certify"),
    "verify element mode with directions": (["verify", "m.json", "--mode", "element",
                                             "--directions", "3"], "--directions", "element"),
    "verify element mode with seed": (["verify", "m.json", "--mode", "element", "--seed", "1"],
                                      "--seed", "element"),
    "grads dps with float64": (["grads", "m.json", "--dps", "60", "--out", "g.npz"], "--dps",
                               "--precision mp"),
}


@pytest.mark.parametrize("case", IGNORED)
def test_an_option_that_would_be_ignored_is_refused(case, cwd, capsys):
    """An option the other options make meaningless (it used to be silently ignored) exits 2
    naming it and what it needs."""
    argv, *needles = IGNORED[case]
    assert_bad_input(argv, capsys, cwd, *needles)


def test_policy_is_accepted_with_an_emulated_precision(cwd, capsys):
    """The other side of the --policy rule: with fp16 it is what it is for."""
    assert_accepted(["train", "m.json", "--steps", "1", "--lr", "0.1", "--precision", "fp16",
                     "--policy", "half", "--json"], capsys)


# --- input files ------------------------------------------------------------------------------

def _params_file(cwd, name, **changes):
    model = Model.load(cwd / "bn.json")
    params = {**model.init_params(), **changes}
    np.savez(cwd / name, **params)
    return name


def test_a_binary_file_given_as_the_model_is_named_as_the_model_spec(cwd, capsys):
    """Not "'utf-8' codec can't decode ...": the message says the model spec is not text."""
    (cwd / "model.bin").write_bytes(bytes(range(256)))
    assert_bad_input(["verify", "model.bin"], capsys, cwd, "model spec model.bin",
                     "not a JSON text file", "0x80")


@pytest.mark.parametrize("path, needle", [("adir", "is a directory"), ("nope.json", "no such file")])
def test_a_model_path_that_is_no_file_is_named_as_the_model_spec(path, needle, cwd, capsys):
    """A directory or a missing file as the model: named as the model spec, with what was found."""
    assert_bad_input(["grads", path, "--out", "g.npz"], capsys, cwd, f"model spec {path}", needle)


@pytest.mark.parametrize("kind", ["npy", "text", "directory", "empty"])
def test_a_params_file_of_the_wrong_kind_is_named_with_what_it_is(kind, cwd, capsys):
    """An .npy (np.load returned a bare array: "does not support the context manager
    protocol"), a text file (reported as pickled data), a directory, an empty file: each named
    as the params file, with what it is and that an .npz (numpy.savez) is expected."""
    name = {"npy": "p.npy", "text": "p.txt", "directory": "adir", "empty": "p.npz"}[kind]
    if kind == "npy":
        np.save(cwd / name, np.zeros(3))
    elif kind == "text":
        (cwd / name).write_text("0.weight = 1\n")
    elif kind == "empty":
        (cwd / name).write_bytes(b"")
    found = {"npy": "a single .npy array", "text": "not an .npz file", "directory":
             "is a directory", "empty": "not an .npz file"}[kind]
    assert_bad_input(["verify", "m.json", "--params", name], capsys, cwd, f"params {name}",
                     found, ".npz")


def test_an_npy_given_as_data_is_named_as_the_data_file(cwd, capsys):
    """The data file goes through the same check as the params file."""
    np.save(cwd / "d.npy", np.zeros((3, 3)))
    assert_bad_input(["train", "m.json", "--steps", "1", "--lr", "0.1", "--data", "d.npy"],
                     capsys, cwd, "data d.npy", "a single .npy array")


def test_a_data_file_with_the_wrong_shape_names_the_file(cwd, capsys):
    """Data errors found by the model's checks are prefixed with the file they came from."""
    np.savez(cwd / "d.npz", x=np.zeros((2, 5)), y=np.zeros((2, 2)))
    assert_bad_input(["verify", "m.json", "--data", "d.npz"], capsys, cwd, "data d.npz",
                     "expected shape (N, 3)", "(2, 5)")


@pytest.mark.parametrize("value", [-1.0, -5e-324])
def test_a_negative_running_var_names_the_buffer_and_the_file(value, cwd, capsys):
    """A running variance below 0 — even the smallest negative float — is refused naming the
    buffer, its layer and the file (eval mode used to fail in mpmath with "no ordering relation
    is defined for complex numbers")."""
    name = _params_file(cwd, "p.npz", **{"1.running_var": np.array([1.0, 2.0, value, 1.0])})
    assert_bad_input(["verify", "bn.json", "--params", name, "--eval"], capsys, cwd,
                     "params p.npz", "1.running_var", "batchnorm", ">= 0", "index (2,)")


def test_a_running_var_of_zero_is_accepted_with_a_positive_eps(cwd, capsys):
    """The bound of the running_var check: 0 is a variance, and eps > 0 keeps √(0 + ε) > 0."""
    name = _params_file(cwd, "p.npz", **{"1.running_var": np.array([1.0, 2.0, 0.0, 1.0])})
    assert_accepted(["verify", "bn.json", "--params", name, "--eval", "--json"], capsys)


def test_a_running_var_of_zero_is_refused_when_eps_is_zero(cwd):
    """With eps = 0 eval mode would divide by √0: running_var must then be > 0."""
    spec = small_spec("tanh", widths=(4,))
    spec["layers"].insert(1, {"type": "batchnorm", "eps": 0})
    model = Model(spec)
    params = {**model.init_params(), "1.running_var": np.array([1.0, 0.0, 1.0, 1.0])}
    with pytest.raises(ValueError, match=r"1\.running_var .* must be > 0 \(a variance; eps is 0\)"):
        model.check_params(params)


@pytest.mark.parametrize("value", [2.5, -1.0])
def test_a_num_batches_tracked_that_is_no_count_names_the_buffer_and_the_file(value, cwd, capsys):
    """num_batches_tracked counts batches: 2.5 or -1 is refused naming the buffer and the file."""
    name = _params_file(cwd, "p.npz", **{"1.num_batches_tracked": np.array(value)})
    assert_bad_input(["grads", "bn.json", "--params", name, "--out", "g.npz"], capsys, cwd,
                     "params p.npz", "1.num_batches_tracked", "whole number", repr(value))


def test_an_int64_num_batches_tracked_as_torch_saves_it_is_accepted(cwd, capsys):
    """torch's state_dict holds num_batches_tracked as int64: it loads."""
    name = _params_file(cwd, "p.npz", **{"1.num_batches_tracked": np.array(7, dtype=np.int64)})
    assert_accepted(["grads", "bn.json", "--params", name, "--out", "g.npz"], capsys)


@pytest.mark.parametrize("argv, needle", [
    (["vectors", "check", "nope"], "DIR nope: no such directory"),
    (["vectors", "check", "afile.txt"], "DIR afile.txt: is a file"),
    (["conformance", "--dir", "nope"], "--dir nope: no such directory"),
])
def test_a_vector_directory_that_is_none_is_named(argv, needle, cwd, capsys):
    """vectors check DIR and conformance --dir name a missing directory, or a file, as such
    (conformance used to complain about torch first)."""
    assert_bad_input(argv, capsys, cwd, needle)


# --- output paths: checked before the work, nothing written -----------------------------------

def _no_work(*args, **kwargs):
    raise AssertionError("the work started before the output path was checked")


# (argv with OUT for the path, the option's name, the function doing the work)
OUTPUTS = {
    "grads --out": (["grads", "m.json", "--out", "OUT"], "--out", ("refnet.cli", "get_backend")),
    "train --save-params": (["train", "m.json", "--steps", "1", "--lr", "0.1", "--save-params",
                             "OUT"], "--save-params", ("refnet.training.loop", "train")),
    "diagnose --plot": (["diagnose", "m.json", "--plot", "OUT"], "--plot",
                        ("refnet.lowp.diagnose", "diagnose")),
}
DIR_OUTPUTS = {
    "study --out": (["study", "--quick", "--out", "OUT"], "--out", ("refnet.study.grid", "run_study")),
    "vectors write": (["vectors", "write", "OUT"], "DIR", ("refnet.interop.vectors", "write")),
}


def _patch_work(monkeypatch, target):
    import importlib
    module, name = target
    monkeypatch.setattr(importlib.import_module(module), name, _no_work)


@pytest.mark.parametrize("where, path, found", [
    ("a directory", "adir", "is a directory"),
    ("a missing directory", "nodir/out.x", "does not exist"),
    ("under a file", "afile.txt/out.x", "is a file, not a directory"),
])
@pytest.mark.parametrize("option", OUTPUTS)
def test_a_file_output_that_cannot_be_written_fails_before_the_work(option, where, path, found,
                                                                      cwd, capsys, monkeypatch):
    """A directory given where a file is written (grads used to write DIR.npz beside it and
    report DIR), or a file in a directory that does not exist or is a file: exit 2 naming the
    option and the path, before the work starts, nothing written."""
    argv, name, work = OUTPUTS[option]
    if option == "diagnose --plot":
        pytest.importorskip("matplotlib")
        path = path.replace(".x", ".png")
    _patch_work(monkeypatch, work)
    argv = [path if a == "OUT" else a for a in argv]
    assert_bad_input(argv, capsys, cwd, f"{name} {path}", found)


@pytest.mark.parametrize("where, path, found", [
    ("an existing file", "afile.txt", "is a file; expected a directory"),
    ("under a file", "afile.txt/sub", "cannot be created"),
])
@pytest.mark.parametrize("option", DIR_OUTPUTS)
def test_a_directory_output_that_cannot_be_made_fails_before_the_work(option, where, path, found,
                                                                        cwd, capsys, monkeypatch):
    """study --quick --out EXISTING_FILE used to fail only after computing 120 models: a
    directory output that is a file, or cannot be created, is refused before the work."""
    argv, name, work = DIR_OUTPUTS[option]
    _patch_work(monkeypatch, work)
    argv = [path if a == "OUT" else a for a in argv]
    assert_bad_input(argv, capsys, cwd, f"{name} {path}", found)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs POSIX permissions, and root may write anywhere")
def test_an_output_in_a_read_only_directory_fails_before_the_work(cwd, capsys, monkeypatch):
    """A directory without write permission is found by os.access before the work."""
    locked = cwd / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _patch_work(monkeypatch, ("refnet.cli", "get_backend"))
        assert_bad_input(["grads", "m.json", "--out", "locked/g.npz"], capsys, cwd,
                         "--out locked/g.npz", "not writable")
    finally:
        locked.chmod(0o700)


def test_diagnose_plot_needs_a_figure_extension(cwd, capsys, monkeypatch):
    """matplotlib appends ".png" to a name without an extension (so the file written would not
    be the one named): such a name is refused before the work."""
    pytest.importorskip("matplotlib")
    _patch_work(monkeypatch, ("refnet.lowp.diagnose", "diagnose"))
    assert_bad_input(["diagnose", "m.json", "--plot", "figure"], capsys, cwd, "--plot figure",
                     ".png", "no extension")


@pytest.mark.parametrize("argv", [["grads", "m.json", "--out", "grads-out"],
                                  ["train", "m.json", "--steps", "1", "--lr", "0.1",
                                   "--save-params", "final"]])
def test_an_npz_output_is_written_at_exactly_the_path_named(argv, cwd, capsys):
    """numpy.savez given "g" writes "g.npz": refnet writes the path it was given, and reports."""
    before = set(_tree(cwd))
    assert_accepted(argv, capsys)
    assert set(_tree(cwd)) - before == {argv[-1]}
    with np.load(cwd / argv[-1], allow_pickle=False) as f:
        assert f.files


# --- one line, always; no warning or traceback in a real process ------------------------------

def test_a_multi_line_error_message_is_printed_as_one_line(cwd, capsys, monkeypatch):
    """main() joins the lines of any message (numpy's can hold newlines) into one."""
    def load(path):
        raise ValueError("first line\nsecond line")
    monkeypatch.setattr(Model, "load", staticmethod(load))
    assert_bad_input(["verify", "m.json"], capsys, cwd, "first line second line")


@pytest.mark.parametrize("case", ["loss scale 1e300", "binary model", "negative running_var"])
def test_bad_input_in_a_real_process_prints_one_line_and_no_warning(case, tmp_path):
    """Run as a user runs it, every warning shown (-W always): exit 2, exactly one line on
    stderr naming what is wrong, no traceback, no warning text (1e300 used to print numpy's
    RuntimeWarning)."""
    (tmp_path / "bn.json").write_text(json.dumps(
        {**small_spec("tanh"), "layers": [{"type": "dense", "out": 4}, {"type": "batchnorm"},
                                          {"type": "dense", "out": 2}]}))
    if case == "loss scale 1e300":
        argv, needle = ["diagnose", "bn.json", "--loss-scale", "1e300"], "--loss-scale"
    elif case == "binary model":
        (tmp_path / "m.bin").write_bytes(bytes(range(256)))
        argv, needle = ["verify", "m.bin"], "model spec m.bin"
    else:
        model = Model.load(tmp_path / "bn.json")
        np.savez(tmp_path / "p.npz", **{**model.init_params(),
                                         "1.running_var": -np.ones(4)})
        argv, needle = ["verify", "bn.json", "--params", "p.npz", "--eval"], "1.running_var"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-W", "always", "-m", "refnet", *argv],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("refnet ") and needle in lines[0], lines
    assert "Warning" not in done.stderr and "Traceback" not in done.stderr
