"""Progress and Ctrl-C: progress goes to stderr and only when asked (stdout stays the report,
byte for byte); a Ctrl-C in verify, train or study exits 130 with one line on stderr and keeps
what was finished, marked partial (refnet/progress.py).

Every interrupt here is a KeyboardInterrupt raised from inside the work (a function the loop
calls, monkeypatched to raise on its k-th call), except one test that sends a real SIGINT to a
child process. Nothing is timed: the reporter's clock is a fake one, or the threshold is 0
(show everything) or inf (show nothing), set through REFNET_PROGRESS_AFTER.
"""

import importlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import small_spec

from refnet import Model, verify
from refnet.cli import EXIT_INTERRUPTED, main
from refnet.io import load_params
from refnet.progress import (
    ENV_AFTER,
    REDRAW_S,
    SHOW_AFTER_S,
    SILENT,
    Interrupted,
    Reporter,
    after_from_env,
)
from refnet.training.loop import LOG_LINES, train
from refnet.training.optim import make_optimizer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "spec" / "examples"
# The module objects (refnet.verification.triangle is also the name of the function the package exports).
verify_module = importlib.import_module("refnet.verification.triangle")
train_module = importlib.import_module("refnet.training.loop")
study_module = importlib.import_module("refnet.study.grid")
REAL_MEASURE = study_module.measure


class Clock:
    """A fake clock: returns the times it is given, one per call."""

    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


class Tty(io.StringIO):
    def isatty(self):
        return True


def raise_on_call(function, k):
    """``function`` that raises KeyboardInterrupt on its k-th call (1-based), as Ctrl-C would in
    the middle of the work."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            raise KeyboardInterrupt
        return function(*args, **kwargs)
    return wrapped


def run_cli(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr); a KeyboardInterrupt escaping main fails the
    test here rather than stopping the whole pytest session."""
    try:
        code = main(argv)
    except KeyboardInterrupt:
        pytest.fail(f"KeyboardInterrupt escaped main({argv})")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_no_traceback(err, start):
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, found {len(lines)}: {err!r}"
    assert lines[0].startswith(start), lines[0]
    assert "Traceback" not in err and "Warning" not in err


@pytest.fixture
def quiet(monkeypatch):
    """No progress at all: stderr holds only what a command says on purpose."""
    monkeypatch.setenv(ENV_AFTER, "inf")


@pytest.fixture
def loud(monkeypatch):
    """Progress from the first item on."""
    monkeypatch.setenv(ENV_AFTER, "0")


# --- the reporter -----------------------------------------------------------------------------

def test_reporter_is_silent_before_the_threshold_and_shows_from_it_on():
    """Nothing until ``after`` seconds have passed: an update at after − 1e-9 s prints nothing,
    the next one, at exactly ``after``, prints its line (elapsed >= after)."""
    stream = io.StringIO()
    bar = Reporter(stream, name="refnet x", after=2.0, clock=Clock(10.0, 10.0, 12.0 - 1e-9, 12.0))
    bar.start(3, "tensors")
    bar.update(0, "first pass")
    bar.update(1, "a ok")
    assert stream.getvalue() == ""
    bar.update(2, "b ok")
    assert stream.getvalue() == "refnet x: 2/3 tensors, 2 s, ~1 s left: b ok\n"
    assert SHOW_AFTER_S == 2.0


def test_plain_lines_are_one_per_item_or_one_per_nth_of_the_run():
    """Not a terminal: one line per update by default; with lines=n one per ceil(total/n)
    items, and always the last item."""
    stream = io.StringIO()
    bar = Reporter(stream, name="r", after=0.0, clock=lambda: 0.0)
    bar.start(3, "tensors")
    for k in range(1, 4):
        bar.update(k)
    assert stream.getvalue().splitlines() == ["r: 1/3 tensors, 0 s, ~0 s left",
                                              "r: 2/3 tensors, 0 s, ~0 s left",
                                              "r: 3/3 tensors, 0 s"]
    stream = io.StringIO()
    bar = Reporter(stream, name="r", after=0.0, clock=lambda: 0.0)
    bar.start(95, "steps", lines=10)                          # a line every 10 steps, and 95
    for k in range(1, 96):
        bar.update(k)
    counts = [line.split()[1] for line in stream.getvalue().splitlines()]
    assert counts == [f"{k}/95" for k in (10, 20, 30, 40, 50, 60, 70, 80, 90, 95)]


def test_a_terminal_bar_is_redrawn_in_place_at_most_every_redraw_interval():
    """On a terminal: '\\r' and one line, redrawn only when REDRAW_S has passed since the last
    draw (an update 1e-9 s short of it is skipped) or at the last item; close() ends the line."""
    stream = Tty()
    times = [0.0, 0.0, REDRAW_S - 1e-9, REDRAW_S, REDRAW_S]
    bar = Reporter(stream, name="r", after=0.0, clock=Clock(*times))
    bar.start(4, "steps")
    bar.update(1, "loss 1")
    bar.update(2, "loss 0.5")                 # too soon: skipped
    bar.update(3, "loss 0.25")
    bar.update(4, "loss 0.125")               # the last: drawn although too soon
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 3 and "2/4" not in text and text.endswith("\n")
    assert text.count("\n") == 1
    assert "\rr [" + "#" * 30 + "] 4/4 steps, 0 s  loss 0.125" in text


def test_unknown_total_counts_without_a_fraction():
    stream = io.StringIO()
    bar = Reporter(stream, name="r", after=0.0, clock=lambda: 0.0)
    bar.start(None, "passes")
    bar.update(2, "pass 3 at loss scale 16384")
    assert stream.getvalue() == "r: 2 passes, 0 s: pass 3 at loss scale 16384\n"


@pytest.mark.parametrize("text, expected", [(None, SHOW_AFTER_S), ("0", 0.0), ("5.5", 5.5),
                                            ("inf", float("inf"))])
def test_the_threshold_comes_from_the_environment(text, expected):
    environ = {} if text is None else {ENV_AFTER: text}
    assert after_from_env(environ) == expected


@pytest.mark.parametrize("text", ["soon", "-1", "nan", ""])
def test_a_bad_threshold_is_an_error_naming_the_variable(text):
    with pytest.raises(ValueError, match=ENV_AFTER):
        after_from_env({ENV_AFTER: text})


def test_a_bad_threshold_exits_2_with_one_line_before_any_work(spec_file, monkeypatch, capsys):
    monkeypatch.setenv(ENV_AFTER, "-3")
    code, out, err = run_cli(["verify", str(spec_file)], capsys)
    assert code == 2 and out == ""
    assert_one_line_no_traceback(err, f"refnet verify: error: environment variable {ENV_AFTER}")


# --- silence by default, stdout unchanged -------------------------------------------------------

def test_library_calls_are_silent_unless_handed_a_reporter(spec_file, loud, capsys):
    """verify(), train() and run_study() print nothing, even with REFNET_PROGRESS_AFTER=0 (only
    the command line reads it)."""
    model = Model.load(spec_file)
    verify(model)
    train(model, None, None, None, make_optimizer("sgd", 0.1), 3)
    study_module.run_study(configs=[study_module.Config("relu", "kaiming", 2, "plain")],
                           check=False)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_verify_reports_per_tensor_on_stderr_and_stdout_is_unchanged(extra, spec_file,
                                                                     monkeypatch, capsys):
    """With progress on from the start, stderr has one line per tensor (named, with its result)
    and stdout is byte for byte what it is without progress."""
    monkeypatch.setenv(ENV_AFTER, "inf")
    code, out_quiet, err_quiet = run_cli(["verify", str(spec_file)] + extra, capsys)
    monkeypatch.setenv(ENV_AFTER, "0")
    code_loud, out_loud, err_loud = run_cli(["verify", str(spec_file)] + extra, capsys)
    assert code == code_loud == 0 and out_loud == out_quiet and err_quiet == ""
    names = ["0.weight", "0.bias", "2.weight", "2.bias", "x"]
    per_tensor = [line for line in err_loud.splitlines() if " ok" in line or "FAIL" in line]
    assert len(per_tensor) == len(names)
    for k, (line, name) in enumerate(zip(per_tensor, names), start=1):
        assert line.startswith(f"refnet verify: {k}/5 tensors") and line.endswith(f"{name} ok")


def test_train_prints_its_steps_on_stderr_and_stdout_is_unchanged(monkeypatch, capsys):
    """About LOG_LINES lines for a run of 45 steps (every third step, and the last), each with
    its loss; stdout identical to a run without progress."""
    argv = ["train", str(EXAMPLES / "relu-mlp-kaiming.json"), "--steps", "45", "--lr", "0.1"]
    monkeypatch.setenv(ENV_AFTER, "inf")
    _, out_quiet, err_quiet = run_cli(argv, capsys)
    monkeypatch.setenv(ENV_AFTER, "0")
    code, out_loud, err_loud = run_cli(argv, capsys)
    assert code == 0 and out_loud == out_quiet and err_quiet == ""
    lines = err_loud.splitlines()
    assert [line.split()[2] for line in lines] == [f"{k}/45" for k in range(3, 46, 3)]
    assert all(": loss " in line for line in lines) and len(lines) <= LOG_LINES + 1


def test_diagnose_dynamic_reports_every_loss_scaling_pass(tmp_path, loud, capsys):
    """An MLP with N(0, 9) weights and an mse loss has fp16 gradients that overflow at the
    first scales (2^16 down to 2^11): a line before every pass, with its scale, and one for the
    outcome; stdout is the JSON alone."""
    spec = tmp_path / "m.json"
    spec.write_text(json.dumps(small_spec("tanh", loss="mse", widths=(8,), out_dim=3, batch=2,
                                          init={"name": "normal", "std": 3.0})))
    code, out, err = run_cli(["diagnose", str(spec), "--loss-scale", "dynamic", "--json"], capsys)
    d = json.loads(out)
    assert d["skipped_steps"] >= 2
    lines = err.splitlines()
    assert len(lines) == d["skipped_steps"] + 2
    assert lines[0].startswith("refnet diagnose: 0 passes, ")
    assert lines[0].endswith("pass 1 at loss scale 65536")
    assert lines[1].endswith("pass 2 at loss scale 32768")
    assert lines[-1].endswith(f"loss scale {d['loss_scale']:g} is clean")


def test_diagnose_with_a_static_scale_shows_no_progress(loud, capsys):
    code, out, err = run_cli(["diagnose", "--preset", "sigmoid-deep"], capsys)
    assert code == 0 and err == ""


# --- Ctrl-C: verify --------------------------------------------------------------------------

@pytest.mark.parametrize("as_json", [False, True])
def test_verify_interrupted_prints_the_tensors_done_marked_incomplete_and_exits_130(
        as_json, spec_file, quiet, monkeypatch, capsys):
    """Ctrl-C while the 3rd of 5 tensors is checked: the report of the 2 finished ones on
    stdout, INCOMPLETE and never PASSED (JSON: "passed" false, "incomplete" says what is
    missing), one line on stderr, exit 130."""
    monkeypatch.setattr(verify_module, "_check_tensor",
                        raise_on_call(verify_module._check_tensor, 3))
    code, out, err = run_cli(["verify", str(spec_file)] + (["--json"] if as_json else []), capsys)
    assert code == EXIT_INTERRUPTED == 130
    assert_one_line_no_traceback(err, "refnet verify: interrupted after 2 of 5 gradient tensors;")
    if as_json:
        report = json.loads(out)
        assert report["passed"] is False
        assert [t["name"] for t in report["tensors"]] == ["0.weight", "0.bias"]
        assert report["incomplete"] == ("interrupted after 2 of 5 gradient tensors; not "
                                        "checked: 2.weight, 2.bias, x")
    else:
        assert "PASSED" not in out and "FAILED" not in out
        assert "\nINCOMPLETE: interrupted after 2 of 5 gradient tensors; not checked: 2.weight, " \
               "2.bias, x" in out
        assert "0.bias" in out and "2.weight " not in out


def test_a_finished_verify_json_has_no_incomplete_key(spec_file, quiet, capsys):
    """The JSON of a run that finished is what it always was: no "incomplete" key."""
    code, out, _ = run_cli(["verify", str(spec_file), "--json"], capsys)
    assert code == 0 and "incomplete" not in json.loads(out)


def test_an_interrupted_verify_never_passes_and_still_names_its_failures(spec_file, monkeypatch):
    """The partial Report: passed is False although every finished tensor passed; a finished
    tensor that failed is still reported as FAILED next to INCOMPLETE."""
    from refnet.cli import format_report
    model = Model.load(spec_file)
    monkeypatch.setattr(verify_module, "_check_tensor",
                        raise_on_call(verify_module._check_tensor, 2))
    with pytest.raises(KeyboardInterrupt) as stop:              # Interrupted is one
        verify(model)
    partial = stop.value.partial
    assert isinstance(stop.value, Interrupted) and (stop.value.done, stop.value.total) == (1, 5)
    assert [t.passed for t in partial.tensors] == [True] and partial.passed is False
    partial.tensors[0].passed = False
    text = format_report(partial, model)
    assert text.endswith("FAILED: 0.weight\nINCOMPLETE: " + partial.incomplete)


def test_verify_interrupted_before_the_first_tensor_has_nothing_to_report(spec_file, quiet,
                                                                        monkeypatch, capsys):
    monkeypatch.setattr(verify_module, "_check_tensor",
                        raise_on_call(verify_module._check_tensor, 1))
    code, out, err = run_cli(["verify", str(spec_file)], capsys)
    assert code == 130 and out == ""
    assert_one_line_no_traceback(err, "refnet verify: interrupted before the first of 5 "
                                      "gradient tensors was checked; nothing to report")


# --- Ctrl-C: train ---------------------------------------------------------------------------

def _trained(steps):
    model = Model.load(EXAMPLES / "relu-mlp-kaiming.json")
    return train(model, None, None, None, make_optimizer("sgd", 0.1), steps)


def test_train_interrupted_keeps_the_history_and_the_parameters_of_the_steps_done(
        tmp_path, quiet, monkeypatch, capsys):
    """Ctrl-C in step 37 of 100 (its dead-ReLU measurement): the JSON history has steps 0–36,
    "stopped" says interrupted, --save-params holds exactly the parameters of a 37-step run,
    one line on stderr, exit 130."""
    monkeypatch.setattr(train_module, "dead_fractions",
                        raise_on_call(train_module.dead_fractions, 38))
    out_params = tmp_path / "p.npz"
    code, out, err = run_cli(["train", str(EXAMPLES / "relu-mlp-kaiming.json"), "--steps", "100",
                              "--lr", "0.1", "--json", "--save-params", str(out_params)], capsys)
    assert code == 130
    assert_one_line_no_traceback(
        err, f"refnet train: interrupted after 37 of 100 steps; the history so far is on stdout, "
             f"the parameters after those 37 steps in {out_params}")
    result = json.loads(out)
    assert result["stopped"] == "interrupted after 37 of 100 steps"
    assert result["steps_done"] == 37 and [h["step"] for h in result["history"]] == list(range(37))
    monkeypatch.undo()
    expected = _trained(37)
    saved = load_params(out_params)
    assert saved.keys() == expected.params.keys()
    for name, value in expected.params.items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)
    assert [h["loss"] for h in result["history"]] == [h["loss"] for h in expected.history]


def test_train_interrupted_prints_the_table_so_far_marked_interrupted(quiet, monkeypatch, capsys):
    monkeypatch.setattr(train_module, "dead_fractions",
                        raise_on_call(train_module.dead_fractions, 4))
    code, out, err = run_cli(["train", str(EXAMPLES / "relu-mlp-kaiming.json"), "--steps", "10",
                              "--lr", "0.1"], capsys)
    assert code == 130
    assert_one_line_no_traceback(err, "refnet train: interrupted after 3 of 10 steps; the "
                                      "history so far is on stdout")
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == ["0", "1", "2"]
    assert lines[-1] == "interrupted after 3 of 10 steps"


def test_train_interrupted_in_its_first_step_writes_no_parameters(tmp_path, quiet, monkeypatch,
                                                                 capsys):
    monkeypatch.setattr(train_module, "dead_fractions",
                        raise_on_call(train_module.dead_fractions, 1))
    out_params = tmp_path / "p.npz"
    code, out, err = run_cli(["train", str(EXAMPLES / "relu-mlp-kaiming.json"), "--steps", "5",
                              "--lr", "0.1", "--save-params", str(out_params)], capsys)
    assert code == 130 and not out_params.exists()
    assert_one_line_no_traceback(err, f"refnet train: interrupted after 0 of 5 steps; the history "
                                      f"so far is on stdout; no step finished, {out_params} not "
                                      f"written")


class RaiseAfter(type(SILENT)):
    """A reporter that raises KeyboardInterrupt when told of item k: after that step's record
    and update are in, the last moment a Ctrl-C can arrive in a step."""

    def __init__(self, k):
        self.k = k

    def update(self, done, note=""):
        if done == self.k:
            raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["before the step is recorded", "after it is recorded"])
def test_interrupted_training_returns_parameters_that_go_with_its_history(where, monkeypatch):
    """Whether Ctrl-C lands inside step 5 (before its record) or just after it (in the progress
    call), the partial result's parameters are those of a run of exactly steps_done steps."""
    model = Model.load(EXAMPLES / "relu-mlp-kaiming.json")
    progress = None
    if where == "before the step is recorded":
        monkeypatch.setattr(train_module, "dead_fractions",
                            raise_on_call(train_module.dead_fractions, 6))
    else:
        progress = RaiseAfter(6)
    with pytest.raises(Interrupted) as stop:
        train(model, None, None, None, make_optimizer("sgd", 0.1), 10, progress=progress)
    monkeypatch.undo()
    partial = stop.value.partial
    assert partial.steps_done == len(partial.history) == (5 if progress is None else 6)
    expected = _trained(partial.steps_done)
    for name, value in expected.params.items():
        np.testing.assert_array_equal(partial.params[name], value, err_msg=name)


# --- Ctrl-C: study ---------------------------------------------------------------------------

@pytest.fixture
def small_grid(monkeypatch):
    """The study's grid cut to 4 quick configurations (the CLI's --quick grid takes a minute)."""
    configs = [study_module.Config(a, "kaiming", 2, "plain") for a in ("relu", "tanh", "selu",
                                                                     "sigmoid")]
    monkeypatch.setattr(study_module, "grid", lambda quick: configs)
    return configs


def test_study_interrupted_writes_the_finished_rows_as_partial_files_and_exits_130(
        tmp_path, small_grid, quiet, monkeypatch, capsys):
    """Ctrl-C in the 3rd of 4 configurations: results.partial.json and .csv hold the 2 finished
    configurations (4 rows: float64 and fp16), results.json is not written (a partial grid is
    never mistaken for the whole), the table of those rows is on stdout, one line, exit 130."""
    monkeypatch.setattr(study_module, "measure", raise_on_call(study_module.measure, 3))
    code, out, err = run_cli(["study", "--no-check", "--out", str(tmp_path)], capsys)
    assert code == 130
    assert_one_line_no_traceback(
        err, f"refnet study: interrupted after 2 of 4 configurations; the 4 finished rows are in "
             f"{tmp_path / 'results.partial.json'} and {tmp_path / 'results.partial.csv'}; their "
             f"table is on stdout")
    rows = json.loads((tmp_path / "results.partial.json").read_text())
    assert [(r["activation"], r["precision"]) for r in rows] == [
        ("relu", "float64"), ("relu", "fp16"), ("tanh", "float64"), ("tanh", "fp16")]
    assert (tmp_path / "results.partial.csv").read_text().count("\n") == 1 + len(rows)
    assert not (tmp_path / "results.json").exists()
    assert len([line for line in out.splitlines() if line.startswith(("relu ", "tanh "))]) == 4


def test_a_complete_study_removes_the_partial_files_of_an_interrupted_one(
        tmp_path, small_grid, quiet, monkeypatch, capsys):
    monkeypatch.setattr(study_module, "measure", raise_on_call(study_module.measure, 2))
    assert run_cli(["study", "--no-check", "--out", str(tmp_path)], capsys)[0] == 130
    assert (tmp_path / "results.partial.json").exists()
    monkeypatch.setattr(study_module, "measure", REAL_MEASURE)
    assert run_cli(["study", "--no-check", "--out", str(tmp_path)], capsys)[0] == 0
    assert len(json.loads((tmp_path / "results.json").read_text())) == 8
    assert not (tmp_path / "results.partial.json").exists()
    assert not (tmp_path / "results.partial.csv").exists()


def test_study_interrupted_in_its_first_configuration_keeps_nothing(tmp_path, small_grid, quiet,
                                                                   monkeypatch, capsys):
    monkeypatch.setattr(study_module, "measure", raise_on_call(study_module.measure, 1))
    code, out, err = run_cli(["study", "--no-check", "--out", str(tmp_path / "o")], capsys)
    assert code == 130 and out == "" and not (tmp_path / "o").exists()
    assert_one_line_no_traceback(err, "refnet study: interrupted after 0 of 4 configurations; "
                                      "nothing to keep")


def test_study_progress_goes_to_stderr_a_line_per_configuration(tmp_path, small_grid, loud,
                                                                capsys):
    code, out, err = run_cli(["study", "--no-check", "--out", str(tmp_path)], capsys)
    assert code == 0
    lines = err.splitlines()
    assert [line.split()[2] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert lines[-1].endswith("sigmoid/kaiming/plain/depth 2")
    assert "refnet study" not in out


# --- Ctrl-C elsewhere, and a real SIGINT -------------------------------------------------------

def test_ctrl_c_in_a_command_without_partial_output_exits_130_with_one_line(quiet, monkeypatch,
                                                                           capsys):
    """diagnose keeps nothing partial: it still ends with exit 130 and one line."""
    diagnose_module = importlib.import_module("refnet.lowp.diagnose")
    monkeypatch.setattr(diagnose_module, "tensor_health",
                        raise_on_call(diagnose_module.tensor_health, 2))
    code, out, err = run_cli(["diagnose", "--preset", "sigmoid-deep"], capsys)
    assert code == 130 and out == ""
    assert_one_line_no_traceback(err, "refnet diagnose: interrupted")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT is POSIX")
def test_a_real_sigint_during_verify_exits_130_with_the_partial_report(tmp_path):
    """python -m refnet verify on a model whose check takes ~10 s; SIGINT as soon as its first
    tensor is reported: exit 130, the report of the tensors done on stdout marked INCOMPLETE,
    and on stderr the progress lines and one last line, no traceback."""
    spec = tmp_path / "m.json"
    spec.write_text(json.dumps(small_spec("tanh", loss="softmax_cross_entropy",
                                          widths=(16, 16, 16), out_dim=3)))
    env = {**os.environ, ENV_AFTER: "0", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "refnet", "verify", str(spec), "--mode",
                              "element"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    seen = []
    for line in child.stderr:
        seen.append(line)
        if " 1/9 tensors" in line:
            break
    child.send_signal(signal.SIGINT)
    out, rest = child.communicate(timeout=120)
    err = "".join(seen) + rest
    assert child.returncode == 130, err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("refnet verify: interrupted after ") and "marked INCOMPLETE" in last
    assert "\nINCOMPLETE: interrupted after " in out and "PASSED" not in out
