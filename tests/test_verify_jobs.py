"""Issue 14, the verify side: one factory for the exact backend (``exact_backend``), the report's
engine and leg timings, and the fan-out of the finite differences over worker processes
(``jobs``) or any ``concurrent.futures.Executor`` — with a report that is the same, bit for bit,
whatever ran it.

The pool tests start real worker processes (spawned: each imports numpy, mpmath and refnet,
~1 s on two cores); the models are small, so the work itself is cheap. Nothing is timed: the
timings are only checked to be there and to add up.
"""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, small_spec

from refnet import Model, spot_check, verify
from refnet.numerics.backend import MPBackend
from refnet.progress import ENV_AFTER, Interrupted
from refnet.verification import triangle

ROOT = Path(__file__).resolve().parent.parent

# BatchNorm and dropout in train mode: the dropout masks drawn in the parent must reach the
# workers, and the batch statistics make every element depend on every other.
BN_DROPOUT = {"input_shape": [4], "seed": 7, "batch": 5, "mode": "train",
              "layers": [{"type": "dense", "out": 6}, {"type": "batchnorm"}, {"type": "relu"},
                         {"type": "dropout", "p": 0.4}, {"type": "dense", "out": 5},
                         {"type": "tanh"}, {"type": "dropout", "p": 0.3},
                         {"type": "dense", "out": 3}],
              "loss": {"type": "softmax_cross_entropy"}}
# x = 0 and zero biases put every relu input at its kink: FD checks that straddle it are
# reported as kinks (the kink notes name the layer and element).
KINKED = {"input_shape": [3], "seed": 0, "batch": 2,
          "layers": [{"type": "dense", "out": 4, "init": "xavier_normal", "bias_init": "zeros"},
                     {"type": "relu"}, {"type": "dense", "out": 2, "init": "xavier_normal"}],
          "loss": {"type": "mse"}}
KINKED_DATA = (np.zeros((2, 3)), np.ones((2, 2)))


def _runs_in_parent(monkeypatch):
    """Counts the FD vectors computed in this process (a pool's workers never call this one)."""
    calls = []
    original = triangle._fd_vector

    def counted(*args):
        calls.append(1)
        return original(*args)
    monkeypatch.setattr(triangle, "_fd_vector", counted)
    return calls


def _bn_dropout_report(**kwargs):
    return verify(Model(BN_DROPOUT), directions=3, **kwargs)


def _kinked_report(**kwargs):
    return verify(Model(KINKED), None, *KINKED_DATA, mode="element", **kwargs)


CASES = {"batchnorm-dropout-train": _bn_dropout_report, "kinked-relu": _kinked_report}


# --- the same report whatever runs the finite differences ------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_the_report_of_two_worker_processes_is_the_report_of_one(case, monkeypatch):
    """jobs=1 and jobs=2 give equal reports as dicts (every digit count, dps, float64 FD error,
    kink note). jobs=2 really ran the vectors elsewhere: none was computed in this process."""
    one = CASES[case](jobs=1).to_dict()
    in_parent = _runs_in_parent(monkeypatch)
    two = CASES[case](jobs=2)
    assert in_parent == []
    assert two.to_dict() == one
    assert multiprocessing.active_children() == []          # the pool is shut down
    if case == "kinked-relu":
        assert sum(t["fd_kinks"] for t in one["tensors"]) > 0 and one["passed"]
    else:
        assert one["train"] and one["passed"]


def test_the_dict_comparison_sees_a_change_of_directions():
    """The equality above has teeth: the same check along other random directions (seed 1) is
    a different dict."""
    assert _bn_dropout_report(jobs=1, seed=1).to_dict() != _bn_dropout_report(jobs=1).to_dict()


def test_a_thread_pool_executor_gives_the_report_of_one_process(monkeypatch):
    """Any concurrent.futures.Executor: every task carries the problem, each thread builds its
    own, and the report is the same."""
    one = _bn_dropout_report(jobs=1).to_dict()
    ran = _runs_in_parent(monkeypatch)            # module-level: the threads see it too
    with ThreadPoolExecutor(3) as executor:
        report = _bn_dropout_report(executor=executor)
    assert report.to_dict() == one
    assert len(ran) == sum(t["fd_checks"] for t in one["tensors"])


def test_a_local_dask_cluster_gives_the_report_of_one_process(monkeypatch):
    """dask.distributed (the ``cluster`` extra): a LocalCluster of two worker processes,
    through ``Client.get_executor()``; the problem travels pickled with every task, and no
    vector is computed in this process."""
    distributed = pytest.importorskip("dask.distributed")
    one = _kinked_report(jobs=1).to_dict()
    in_parent = _runs_in_parent(monkeypatch)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        report = _kinked_report(executor=client.get_executor())
    assert report.to_dict() == one and in_parent == []


def test_the_payload_digest_changes_with_every_part_of_the_problem():
    """Workers keep a problem under the digest of its payload: a different parameter value,
    dropout mask, input or engine is a different problem."""
    model = Model(BN_DROPOUT)
    params, x, y = model.prepare()
    state = model.default_state()
    g = model.loss_and_grads(triangle.FLOAT64, params, x, y, state)
    base = dict(spec=model.spec, params=params, x=x, y=y, train=True, masks=dict(state.masks),
                base_signatures=g.forward.kink_signatures, engine="auto", prefix_cache=True)
    key = triangle._Payload(**base).key()
    assert triangle._Payload(**base).key() == key
    nudged = {**params, "0.weight": params["0.weight"] + 2.0 ** -40}
    mask = next(iter(state.masks))
    flipped = {**state.masks, mask: (state.masks[mask] == 0).astype(state.masks[mask].dtype)}
    for change in ({"params": nudged}, {"masks": flipped}, {"x": x * 2}, {"engine": "mpmath"}):
        assert triangle._Payload(**{**base, **change}).key() != key, change


# --- when a pool is used -------------------------------------------------------------------

def test_by_default_a_small_model_runs_in_this_process(monkeypatch):
    """jobs=None: below POOL_MIN_WORK (checks × values of one forward) no pool is started."""
    monkeypatch.setattr(triangle, "available_cores", lambda: 2)
    in_parent = _runs_in_parent(monkeypatch)
    report = _bn_dropout_report()
    assert len(in_parent) == sum(t.fd_checks for t in report.tensors)


def test_by_default_a_model_above_the_threshold_uses_every_core(monkeypatch):
    """The same model with the threshold lowered to 0 goes to a pool of available_cores()."""
    monkeypatch.setattr(triangle, "available_cores", lambda: 2)
    monkeypatch.setattr(triangle, "POOL_MIN_WORK", 0)
    in_parent = _runs_in_parent(monkeypatch)
    _bn_dropout_report()
    assert in_parent == []


def test_progress_is_reported_per_finished_tensor_in_order_with_a_pool():
    class Record:
        def __init__(self):
            self.updates = []

        def start(self, total, unit, lines=None):
            self.total = total

        def update(self, done, note=""):
            self.updates.append((done, note))

        def close(self):
            pass
    record = Record()
    report = _bn_dropout_report(jobs=2, progress=record)
    finished = [(done, note) for done, note in record.updates if done > 0]
    assert finished == [(k, f"{t.name} ok") for k, t in enumerate(report.tensors, start=1)]


# --- Ctrl-C --------------------------------------------------------------------------------

def test_ctrl_c_with_a_pool_keeps_the_finished_tensors_and_leaves_no_worker(monkeypatch):
    """A KeyboardInterrupt while the 3rd tensor is gathered: the 2 finished ones are the
    partial report, the vectors not run are cancelled and every worker has exited."""
    original, calls = triangle._check_tensor, []

    def interrupted_at_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(triangle, "_check_tensor", interrupted_at_3)
    with pytest.raises(Interrupted) as stop:
        _bn_dropout_report(jobs=2)
    partial = stop.value.partial
    assert [t.name for t in partial.tensors] == ["0.weight", "0.bias"]
    assert partial.passed is False and partial.incomplete.startswith("interrupted after 2 of")
    assert multiprocessing.active_children() == []


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
def test_a_terminal_ctrl_c_reaches_the_workers_too_and_still_ends_in_one_line(tmp_path):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does) during
    ``refnet verify --jobs 2``: exit 130, the partial report on stdout, one last line on stderr
    and no traceback from the parent or a worker; no process of the group is left."""
    spec = tmp_path / "m.json"
    spec.write_text(json.dumps(small_spec("tanh", loss="softmax_cross_entropy",
                                          widths=(16, 16, 16), out_dim=3)))
    env = {**os.environ, ENV_AFTER: "0", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "refnet", "verify", str(spec), "--mode",
                              "element", "--jobs", "2"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    seen = []
    for line in child.stderr:
        seen.append(line)
        if " 1/9 tensors" in line:
            break
    os.killpg(child.pid, signal.SIGINT)
    out, rest = child.communicate(timeout=120)
    err = "".join(seen) + rest
    assert child.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.splitlines()[-1].startswith("refnet verify: interrupted after ")
    assert "\nINCOMPLETE: interrupted after " in out
    # Nobody left in the group: the workers were joined before the parent exited; the
    # multiprocessing resource tracker leaves when it sees the parent gone (allowed 10 s).
    for _ in range(100):
        try:
            os.killpg(child.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a process of verify's group outlived it")


# --- the exact engine ----------------------------------------------------------------------

def test_every_exact_backend_comes_from_exact_backend(monkeypatch):
    """verify (the dps-digit run and every FD precision) and spot_check construct no exact
    backend but through the one factory (engine mpmath, whose backend is MPBackend)."""
    made, asked = [], []

    class Counted(MPBackend):
        def __init__(self, *args, **kwargs):
            made.append(args)
            super().__init__(*args, **kwargs)
    factory = triangle.exact_backend
    monkeypatch.setattr(triangle, "MPBackend", Counted)
    monkeypatch.setattr(triangle, "exact_backend",
                        lambda dps, engine="auto", size=None: asked.append(dps)
                        or factory(dps, engine, size))
    report = _bn_dropout_report(jobs=1, engine="mpmath")
    model = Model(BN_DROPOUT)
    spot_check(model, *model.prepare(), dps=30, engine="mpmath")
    assert len(made) == len(asked) >= 3
    assert asked[0] == 50 and asked[-1] == 30           # verify's first, spot_check's last
    assert set(asked[1:-1]) >= {t.fd_dps for t in report.tensors}     # the FD precisions


def test_the_report_names_the_engine_that_ran():
    report = _kinked_report(jobs=1, engine="mpmath")
    assert report.engine == repr(MPBackend(50)) == "<refnet backend mp, 50 digits>"
    assert report.to_dict()["engine"] == report.engine


@pytest.mark.parametrize("bad, needle", [
    ({"engine": "bigint"}, "engine must be one of auto, expansion, mpmath"),
    ({"jobs": 0}, "jobs must be an integer >= 1"),
    ({"jobs": 1.5}, "jobs must be an integer >= 1"),
    ({"jobs": True}, "jobs must be an integer >= 1"),
    ({"jobs": 2, "executor": ThreadPoolExecutor(1)}, "give jobs or executor, not both"),
    ({"executor": object()}, "executor must have concurrent.futures.Executor's submit"),
])
def test_bad_engine_jobs_or_executor_is_a_clear_error(bad, needle):
    with pytest.raises(ValueError, match=needle):
        verify(Model(KINKED), **bad)


def test_spot_check_refuses_an_unknown_engine():
    model = Model(KINKED)
    with pytest.raises(ValueError, match="engine must be one of"):
        spot_check(model, *model.prepare(), engine="fast")


# --- timings -------------------------------------------------------------------------------

def test_the_report_times_each_leg_and_leaves_them_out_of_the_plain_dict():
    """Five legs, each >= 0 s; the float64 and exact passes run one after the other within the
    total. to_dict() stays a function of the inputs (no timings); to_dict(timings=True) adds
    them."""
    report = _kinked_report(jobs=1)
    t = report.timings
    assert set(t) == {"float64_and_bound", "exact", "fd_exact", "fd_float64", "total"}
    assert all(v >= 0 for v in t.values())
    assert t["float64_and_bound"] + t["exact"] + t["fd_exact"] + t["fd_float64"] <= t["total"]
    assert "timings" not in report.to_dict()
    assert report.to_dict(timings=True)["timings"] == t




@pytest.fixture
def spec_path(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_AFTER, "inf")
    path = tmp_path / "m.json"
    path.write_text(json.dumps(small_spec("tanh", widths=(3,))))
    return str(path)


def test_verify_names_the_engine_and_with_timings_the_seconds_of_each_leg(spec_path, capsys):
    """JSON: "engine" always, "timings" with --timings; text: an "exact engine:" line always,
    a "time:" line with --timings. Without --timings the output of a command is a function of
    its inputs (tests/test_progress.py compares two runs byte for byte)."""
    code, out, _ = run_cli(["verify", spec_path, "--json", "--jobs", "1", "--engine", "mpmath",
                         "--timings"], capsys)
    d = json.loads(out)
    assert code == 0 and d["engine"] == "<refnet backend mp, 50 digits>"
    assert set(d["timings"]) == {"float64_and_bound", "exact", "fd_exact", "fd_float64", "total"}
    code, out, _ = run_cli(["verify", spec_path, "--json"], capsys)
    assert code == 0 and "timings" not in json.loads(out)
    code, out, _ = run_cli(["verify", spec_path, "--timings", "--engine", "mpmath"], capsys)
    lines = out.splitlines()
    assert code == 0 and "exact engine: <refnet backend mp, 50 digits>" in lines
    assert any(line.startswith("time: float64 + bound ") and " total " in line for line in lines)
    code, out, _ = run_cli(["verify", spec_path], capsys)
    assert not any(line.startswith("time:") for line in out.splitlines())


@pytest.mark.parametrize("argv, needles", [
    (["--jobs", "0"], ["--jobs must be an integer >= 1", "got 0"]),
    (["--jobs", "two"], ["--jobs", "invalid int value: 'two'"]),
    (["--engine", "bigint"], ["--engine", "invalid choice: 'bigint'"]),
    (["--certify", "--jobs", "2"], ["--jobs has no effect with --certify"]),
    (["--certify", "--engine", "mpmath"], ["--engine has no effect with --certify"]),
    (["--certify", "--timings"], ["--timings has no effect with --certify"]),
])
def test_a_bad_jobs_or_engine_option_exits_2_with_one_line(argv, needles, spec_path, capsys):
    code, out, err = run_cli(["verify", spec_path] + argv, capsys)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for needle in needles:
        assert needle in err, err


# --- the loss is assembled in the model --------------------------------------------------

def test_the_fd_prefix_path_runs_the_models_own_forward_from_layer_k(monkeypatch):
    """_Problem no longer assembles a loss of its own: a perturbed tensor of top-level layer k
    is evaluated by Model.forward_tensors(start=k)."""
    model = Model(BN_DROPOUT)
    params, x, y = model.prepare()
    state = model.default_state()
    model.loss_and_grads(triangle.FLOAT64, params, x, y, state)
    problem = triangle._Problem(model, params, x, y, state)
    starts = []
    original = Model.forward_tensors

    def recorded(self, *args, start=0, **kwargs):
        starts.append(start)
        return original(self, *args, start=start, **kwargs)
    monkeypatch.setattr(Model, "forward_tensors", recorded)
    problem.loss(triangle.FLOAT64, "4.weight", problem.base("4.weight") * 2)
    assert starts == [0, 4]           # the prefix (a full forward), then from layer 4


def test_a_forward_from_a_later_layer_needs_the_prefix():
    model = Model(KINKED)
    params, x, y = model.prepare()
    tensors = {k: triangle.FLOAT64.asarray(v) for k, v in params.items()}
    with pytest.raises(ValueError, match="the prefix of layers < 2 is needed"):
        model.forward_tensors(triangle.FLOAT64, tensors, x, y, start=2)


# --- the study on an executor ----------------------------------------------------------------

def test_the_study_on_an_executor_gives_the_rows_of_a_run_in_this_process():
    """run_study(executor=...): one task per configuration, rows gathered in the grid's order;
    the same rows (as JSON, spot checks included) as without it."""
    from dataclasses import asdict

    from refnet.study.grid import Config, run_study
    configs = [Config("tanh", "xavier", 3, "plain"), Config("relu", "kaiming", 3, "batchnorm"),
               Config("sigmoid", "normal-0.01", 3, "residual")]
    here = run_study(configs=configs)
    with ThreadPoolExecutor(2) as executor:
        there = run_study(configs=configs, executor=executor)
    as_json = lambda rows: json.dumps([asdict(r) for r in rows])     # noqa: E731
    assert as_json(there) == as_json(here) and len(here) == 6


def test_compare_prints_the_verify_ratio_with_the_mpmath_speedup_and_the_peak_rss(tmp_path):
    """benchmarks/compare.py: a verify-* group's ratio is verify/float64, followed by the
    speed-up over the mpmath path and the peak RSS where the run has them; --json stays one
    ratio per group."""
    run = {"benchmarks": [
        {"group": "verify-lenet5", "params": {}, "stats": {"mean": 9.0},
         "extra_info": {"ratio_to_float64": 1500.0, "speedup_over_mpmath": 1.25,
                        "peak_rss_mib": 387.4}}]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    compare = str(ROOT / "benchmarks" / "compare.py")
    text = subprocess.run([sys.executable, compare, str(path)], capture_output=True,
                          text=True, check=True).stdout
    assert ("verify-lenet5" in text and "1.5e+03  (verify/float64); 1.25x the mpmath path; "
            "peak RSS 387 MiB" in text)
    out = subprocess.run([sys.executable, compare, str(path), "--json"], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == {"verify-lenet5": 1500.0}
