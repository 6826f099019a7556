"""README.md cannot drift: its usage block lists every option of every command, its Python
examples run, its exit-status table names every command, and the numbers it prints — the
figure's description, the sample verify report, the diagnose examples — are recomputed from
fresh runs and compared at the digits the README shows."""

import argparse
import json
import math
import re
from pathlib import Path

import pytest

from refnet.cli import DESCRIPTION, build_parser, main
from refnet.study import grid as study

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _flat(text: str) -> str:
    """Markdown prose as one line: whitespace runs to one space, bold markers dropped."""
    return " ".join(text.replace("**", "").split())


def _fenced(language: str):
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end >= 0 else None]


# --- the usage block ----------------------------------------------------------------------

def _usage_by_command():
    """The usage block's text per subcommand (a command's continuation lines are indented)."""
    block = _fenced("bash")[1]
    assert block.startswith("refnet study"), "the usage block is the second bash block"
    usage, current = {}, None
    for line in block.splitlines():
        m = re.match(r"refnet (\S+)", line)
        if m:
            current = m.group(1)
            usage[current] = usage.get(current, "") + line
        elif current:
            usage[current] += " " + line
    return usage


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_option_and_choice_of_every_command_is_in_the_readme_usage_block():
    """Introspects the argparse parser: each subcommand has a usage line, and each of its
    option strings and each allowed choice (of an option or a positional) appears in it."""
    parser, commands = _subcommands()
    usage = _usage_by_command()
    missing = []
    for name, sub in commands.items():
        if name not in usage:
            missing.append(f"refnet {name}")
            continue
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                if not re.search(rf"{option}\b", usage[name]):
                    missing.append(f"refnet {name} {option}")
            for choice in action.choices or ():
                if not re.search(rf"(?<![\w-]){re.escape(str(choice))}(?![\w-])", usage[name]):
                    missing.append(f"refnet {name} ... {choice}")
    for action in parser._actions:                          # refnet --version
        for option in action.option_strings:
            if option.startswith("--") and option != "--help" and option not in usage:
                missing.append(f"refnet {option}")
    assert missing == [], f"not in the README's usage block: {missing}"


def test_the_exit_status_table_has_a_row_for_every_command_and_names_2_and_130():
    table = _section("Using it")
    _, commands = _subcommands()
    for name in commands:
        assert re.search(rf"^\| `{name}[` ]", table, re.M), f"no exit-status row for {name}"
    flat = _flat(table)
    assert "exits 2 on bad input" in flat
    assert "exits 130 when interrupted (Ctrl-C), keeping what is done" in flat


def test_refnet_help_opens_with_a_whole_sentence(capsys):
    """The parser's description was the module docstring's first line, cut mid-sentence."""
    assert DESCRIPTION.endswith(".") and "``" not in DESCRIPTION
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    squeeze = lambda text: "".join(text.split())   # argparse wraps to the terminal  # noqa
    assert squeeze(DESCRIPTION) in squeeze(capsys.readouterr().out)


# --- the Python examples --------------------------------------------------------------------

PYTHON_BLOCKS = _fenced("python")


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_the_readme_python_examples_run(index, tmp_path, monkeypatch):
    """Each ```python block runs as written, from a directory holding the repository's spec/
    (the README says: run from the repository root), writing its files there."""
    block = PYTHON_BLOCKS[index]
    if "import torch" in block:
        pytest.importorskip("torch")
    (tmp_path / "spec").symlink_to(ROOT / "spec")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"README.md python block {index + 1}", "exec"), {})


def test_the_readme_has_python_examples():
    assert len(PYTHON_BLOCKS) >= 2


def test_the_verify_json_keys_the_readme_lists_are_in_the_report():
    from conftest import small_spec

    from refnet import Model, verify
    paragraph = README[README.index("`refnet verify --json`"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    keys = re.findall(r'`"(\w+)"`', paragraph)
    assert {"passed", "tensors", "name", "max_ulp", "fd_digits"} <= set(keys)
    report = verify(Model(small_spec(widths=(2,))), mode="element").to_dict()
    tensor_keys = set(report["tensors"][0])
    for key in keys:
        assert key in report or key in tensor_keys, key


# --- the study: the grids and the figure's description -----------------------------------

def test_the_readme_describes_the_grids_the_study_runs():
    quick, full = study.QUICK, study.FULL
    flat = _flat(README)
    n_quick = len(study.grid(quick=True))
    assert f"{n_quick} small networks — {', '.join(quick['activations'])} × five inits × " \
           f"{', '.join(quick['archs'])} × depths {quick['depths'][0]} and " \
           f"{quick['depths'][1]}" in flat
    assert len(quick["inits"]) == 5
    assert f"spot-checked against a {study.SPOT_CHECK_DPS}-digit reference" in flat
    assert (f"{len(full['activations'])} activations × {len(full['inits'])} inits × "
            f"{len(full['archs'])} architectures × depths {min(full['depths'])}–"
            f"{max(full['depths'])} × {len(full['precisions'])} precisions") in flat


WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
         8: "eight", 9: "nine", 10: "ten"}
INIT_NAMES = {"normal-0.01": "N(0, 0.01)", "normal-1": "N(0, 1)", "xavier": "Xavier",
              "kaiming": "Kaiming", "lecun": "LeCun", "orthogonal": "orthogonal"}


def _e(v, digits=1):
    """1.3e7, 4e-16: the README's way of writing a number."""
    mantissa, exponent = f"{v:.{digits}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _and(items):
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _one(values, what):
    values = sorted(set(values))
    assert len(values) == 1, f"the README groups {what} under one value; the study has {values}"
    return values[0]


def figure_statements(results):
    """The README's reading of the figure, generated from the study's results at the deepest
    depth: the numbers (rounded as printed), the counts and the lists of configurations. Each
    statement is a sentence that must appear in the README as it is (modulo line breaks)."""
    depth = max(r.depth for r in results)
    at = {(r.activation, r.init, r.arch, r.precision): r for r in results if r.depth == depth}
    plain = [r for r in results if r.depth == depth and r.arch == "plain"
             and r.precision == "float64"]
    by_ratio = [r for r in plain if r.verdict == "vanishing" and r.ratio is not None
                and r.ratio < study.RATIO_RANGE[0]]
    by_norm = [r for r in plain if r.verdict == "vanishing" and r not in by_ratio]
    exploding = [r for r in plain if r.verdict == "exploding"]
    statements = []

    steepest = min(by_ratio, key=lambda r: r.ratio)
    rest = [r for r in by_ratio if r is not steepest]
    statements.append(
        f"{steepest.activation} with {INIT_NAMES[steepest.init]} weights falls "
        f"{round(-math.log10(steepest.ratio))} orders of magnitude from the output layer to the "
        f"first (first/last = {_e(steepest.ratio)}), "
        f"{_one((r.activation for r in rest), 'the other steep lines')} with "
        f"{_and(INIT_NAMES[r.init] for r in rest)} weights still "
        f"{_and(f'{-math.log10(r.ratio):.1f}' for r in rest)};")

    statements.append(
        f"a flat line far below the band is vanishing too: {_and(r.activation for r in by_norm)} "
        f"with {INIT_NAMES[_one((r.init for r in by_norm), 'the flat low lines')]} weights pass "
        f"almost no signal forward, and every layer's gradient is tiny ("
        + _and(f"{_e(min(r.grad_norms), 0)} to {_e(max(r.grad_norms), 0)}" for r in by_norm)
        + ");")

    statements.append(
        f"a line far above the band is exploding: {_and(r.activation for r in exploding)} with "
        f"{INIT_NAMES[_one((r.init for r in exploding), 'the exploding lines')]} weights sit at "
        + _and(f"{_e(min(r.grad_norms))} to {_e(max(r.grad_norms))}" for r in exploding) + ";")

    healthy = [f"{a} + {INIT_NAMES[i]}" for a, i in
               (("relu", "kaiming"), ("tanh", "xavier"), ("selu", "lecun"))
               if at[(a, i, "plain", "float64")].verdict == "healthy"]
    statements.append(f"flat lines inside the band are healthy: {', '.join(healthy)};")

    vanishing = by_ratio + by_norm
    rescued_by_both = all(at[(r.activation, r.init, arch, "float64")].verdict == "healthy"
                          for r in vanishing for arch in ("batchnorm", "residual"))
    bn_rescues = [r for r in exploding
                  if at[(r.activation, r.init, "batchnorm", "float64")].verdict == "healthy"]
    residual_fails = [r for r in exploding
                      if at[(r.activation, r.init, "residual", "float64")].verdict != "healthy"]
    broken = [at[(r.activation, r.init, "residual", "float64")] for r in plain
              if r.verdict == "healthy"
              and at[(r.activation, r.init, "residual", "float64")].verdict == "exploding"]
    assert rescued_by_both and bn_rescues == exploding and residual_fails == exploding, \
        "the README's rescue sentence no longer describes the study: rewrite it"
    statements.append(
        f"all {WORDS[len(vanishing)]} vanishing plain networks become healthy with either; the "
        f"{WORDS[len(exploding)]} exploding ones ({_and(r.activation for r in exploding)} with "
        f"{INIT_NAMES[exploding[0].init]}) are rescued by BatchNorm but not by residual blocks")
    statements.append(
        f"residual blocks make {WORDS[len(broken)]} healthy plain networks explode: "
        f"{_and(r.activation for r in broken)} with "
        f"{INIT_NAMES[_one((r.init for r in broken), 'the residual explosions')]} weights reach "
        f"{_and(_e(max(r.grad_norms)) for r in broken)};")

    fp16 = {(r.activation, r.init): at[(r.activation, r.init, "plain", "fp16")]
            for r in vanishing}
    zeros = {k: [i for i, v in enumerate(r.grad_norms) if v == 0] for k, r in fp16.items()}
    n_layers = depth + 1
    whole = [k for k, z in zeros.items() if len(z) == n_layers]
    partly = [k for k, z in zeros.items() if 0 < len(z) < n_layers]
    assert all(zeros[k] == list(range(len(zeros[k]))) for k in partly), \
        "fp16 zeros are no longer the first layers: rewrite the README's fp16 sentence"
    assert len(whole) + len(partly) == len(vanishing)
    all_nonfinite = {(r.activation, r.init, r.arch) for r in results
                     if r.depth == depth and r.precision == "fp16"
                     and all(v is None for v in r.grad_norms)}
    assert all_nonfinite == {(r.activation, r.init, arch) for r in exploding
                             for arch in ("plain", "residual")}
    statements.append(
        f"in fp16 (autocast, no loss scaling) the vanishing plain networks lose their first "
        f"layers' gradients entirely: all {n_layers} layers for {_and(a for a, _ in whole)} with "
        f"{INIT_NAMES[_one((i for _, i in whole), 'the all-zero fp16 nets')]}, the first "
        f"{_and(len(zeros[k]) for k in partly)} for "
        f"{_one((a for a, _ in partly), 'the partly zero fp16 nets')} with "
        f"{_and(INIT_NAMES[i] for _, i in partly)}; the exploding ones, plain and residual, are "
        f"inf/NaN in every layer.")
    return statements


@pytest.fixture(scope="module")
def deepest_quick_study():
    """The quick study's depth-12 configurations in float64 and fp16, as `refnet study --quick`
    runs them (the same seeds; no spot checks, which do not enter the figure): ~5 s."""
    configs = [c for c in study.grid(quick=True) if c.depth == max(study.QUICK["depths"])]
    return study.run_study(configs=configs, check=False, progress=False)


def test_the_figure_description_is_what_the_quick_study_finds(deepest_quick_study):
    """Every number, count and list in the README's reading of the figure, recomputed from the
    study (verdicts by study.judge's named thresholds; numbers rounded as the README prints
    them, so last-bit differences between machines cannot change them)."""
    text = _flat(_section("The study, in one figure"))
    for statement in figure_statements(deepest_quick_study):
        assert _flat(statement) in text, f"the README should say: {statement}"


def test_the_figure_statements_fail_on_a_planted_change(deepest_quick_study):
    """The comparison can fail: one sigmoid ratio moved from 3.4e-8 to 3.4e-9 changes the
    generated sentence, which then is not in the README."""
    import copy
    results = copy.deepcopy(deepest_quick_study)
    r = next(r for r in results if (r.activation, r.init, r.arch, r.precision) ==
             ("sigmoid", "xavier", "plain", "float64"))
    r.ratio /= 10
    text = _flat(_section("The study, in one figure"))
    assert any(_flat(s) not in text for s in figure_statements(results))


def test_the_readme_figure_has_the_quick_study_grids_panel_layout():
    """docs/study-grad-norms.png is a PNG of the size grad_norm_figure gives the quick grid (5
    inits × 4 activations at 90 dpi). Its pixels are not compared (they follow the matplotlib
    and FreeType versions); what it draws is, by the figure-description test above."""
    png = (ROOT / "docs" / "study-grad-norms.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (int(2.6 * 5 * 90), int(2.1 * 4 * 90))


# --- the diagnose examples ------------------------------------------------------------------

def test_the_readme_diagnose_examples_say_what_diagnose_finds(capsys):
    """sigmoid-deep: the fp16 gradients of the first 9 Linear layers are all zero (exit 0);
    relu-normal1: inf first appears in the 5th Linear's output (exit 1)."""
    flat = _flat(README)
    assert ("`refnet diagnose --preset sigmoid-deep` (fp16 gradients of the first 9 layers "
            "underflow entirely)") in flat
    assert "`--preset relu-normal1` (the 5th Linear overflows)" in flat
    assert main(["diagnose", "--preset", "sigmoid-deep", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    weights = [t for t in d["tensors"]
               if t["kind"] == "param_grad" and t["name"].endswith("weight")]
    entirely = [t["underflow"] == t["numel"] for t in weights]
    assert entirely.index(False) == 9 and all(entirely[:9])
    assert main(["diagnose", "--preset", "relu-normal1", "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    from refnet.model import Model
    from refnet.study.presets import preset
    layers = Model(preset("relu-normal1")).layers
    dense = [i for i, layer in enumerate(layers) if layer.type == "dense"]
    assert f"layer {dense[4]} (dense) output holds inf" in d["first_nonfinite"]


# --- the sample verify report ---------------------------------------------------------------

COLUMNS = ("tensor", "shape", "max|g|", "ulp err", "bound", "FD digits", "dps", "f64 FD err",
           "noise", "result")


def _rows(text):
    rows = {}
    for line in text.splitlines():
        tokens = line.split()
        if len(tokens) == len(COLUMNS) and tokens[-1] in ("ok", "FAIL"):
            rows[tokens[0]] = dict(zip(COLUMNS, tokens))
    return rows


@pytest.mark.slow
def test_the_readme_sample_report_is_a_fresh_run_of_the_same_command(capsys):
    """`refnet verify spec/examples/sigmoid-deep-20.json` (5 s), compared with the README's
    excerpt at the printed digits. Exact: tensor, shape, max|g|, FD digits and dps (mp
    arithmetic), the noise level, the result, and the float64 FD error where the noise is above
    1 (there the float64 difference is 0 and the error is |Σ g·v|/Σ|g·v|). Not compared: the
    ulp error and its bound, which follow the BLAS kernel's summation order (the README says
    so); for them the README's rows and the fresh ones must each satisfy err ≤ bound. Where the
    noise is below 1 the float64 FD error is rounding noise of a loss whose last bits follow
    BLAS too: it must agree within a factor 3. The loss is compared to 12 digits."""
    assert main(["verify", str(ROOT / "spec" / "examples" / "sigmoid-deep-20.json")]) == 0
    fresh_text = capsys.readouterr().out
    block = _section("Reading the report")
    sample_text = block[block.index("```\n") + 4:block.index("\n```", block.index("```\n"))]
    sample, fresh = _rows(sample_text), _rows(fresh_text)
    assert len(sample) >= 5 and set(sample) <= set(fresh)
    for name, row in sample.items():
        new = fresh[name]
        for column in ("shape", "max|g|", "FD digits", "dps", "noise", "result"):
            assert row[column] == new[column], (name, column, row[column], new[column])
        for r in (row, new):
            assert float(r["ulp err"]) <= float(r["bound"]), (name, r)
        noise = float(row["noise"].strip("()"))
        err, new_err = float(row["f64 FD err"]), float(new["f64 FD err"])
        if noise >= 1:
            assert row["f64 FD err"] == new["f64 FD err"], name
        else:
            assert new_err / 3 <= err <= 3 * new_err, name
    sample_lines, fresh_lines = sample_text.splitlines(), fresh_text.splitlines()
    assert sample_lines[1:4] == fresh_lines[1:4] and sample_lines[-1] == fresh_lines[-1]
    loss = lambda line: float(line.split()[1])                       # noqa: E731
    assert loss(sample_lines[0]) == pytest.approx(loss(fresh_lines[0]), rel=1e-12)

    # The claims the README makes from this report.
    g0, g_last = float(fresh["0.weight"]["max|g|"]), float(fresh["38.weight"]["max|g|"])
    per_layer = (g_last / g0) ** (1 / 19)
    assert "falls by ~100× per layer" in README and round(math.log10(per_layer)) == 2
    m = re.search(r"resolving a (\S+) gradient\s+takes (\d+) digits", README)
    assert math.floor(math.log10(g0)) == math.floor(math.log10(float(m.group(1))))   # 4.4e-39
    assert m.group(2) == fresh["0.weight"]["dps"]
    m = re.search(r"the noise is (\S+) times the gradient", _flat(README))
    assert float(m.group(1)) == float(fresh["0.weight"]["noise"].strip("()"))
