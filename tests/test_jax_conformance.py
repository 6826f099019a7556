"""JAX against the golden vectors: refnet's JAX twin and an adapter written from
spec/conformance.md alone pass every vector in float64 and float32 with kinks compared strictly,
and every convention of spec/vectors.md's table, changed in that adapter, fails a vector of its
row. Skipped without jax (`pip install 'refnet[jax]'`); the table's own checks run without."""

import ast
import json
import re
from pathlib import Path

import pytest

from refnet.cli import main

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
ADAPTER = Path(__file__).resolve().parent / "jax_adapter_independent.py"


def conventions_table():
    """The rows of spec/vectors.md's "Which vector pins which convention" table:
    (convention, [vector names], adapter switch, fails without --strict-kinks)."""
    text = (ROOT / "spec" / "vectors.md").read_text()
    body = text.split("<!-- conventions table: tests/test_jax_conformance.py reads it -->")[1]
    body = body.split("<!-- end of conventions table -->")[0]
    rows = []
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.append((cells[0], re.findall(r"`([^`]+)`", cells[1]), cells[3].strip("`"),
                     {"yes": True, "no": False}[cells[4]]))
    return rows


def adapter_switches():
    """MUTATIONS of the independent adapter, read from its source (no jax needed)."""
    tree = ast.parse(ADAPTER.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "MUTATIONS":
            return {k.value for k in node.value.keys}
    raise AssertionError("no MUTATIONS in the adapter")


def test_the_conventions_table_names_existing_vectors_and_adapter_switches():
    """Every row names vectors that exist and a switch the adapter has; every switch has a row,
    and the issue's nine conventions (gelu's form, relu′ and leaky_relu′ at 0, the batchnorm
    variance, layernorm's ε, max-pool ties, avgpool's padding, softplus's threshold, a flipped
    kernel) are among them."""
    rows = conventions_table()
    switches = adapter_switches()
    assert {r[2] for r in rows} == switches
    for convention, vectors, switch, _ in rows:
        assert vectors, convention
        for name in vectors:
            assert (VECTORS / f"{name}.json").exists(), (convention, name)
    assert {"gelu_tanh_form", "relu_grad_one_at_zero", "leaky_relu_grad_one_at_zero",
            "unbiased_batchnorm_variance", "layernorm_eps_outside_root", "last_maximum_ties",
            "avgpool_exclude_padding", "softplus_no_threshold", "flipped_conv_kernel"} <= switches


def test_the_independent_adapter_imports_nothing_of_refnet():
    """Written from the guide alone: numpy, jax and the standard library."""
    tree = ast.parse(ADAPTER.read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
               for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module}
    assert "refnet" not in modules and modules <= {"__future__", "glob", "json", "math", "os",
                                                   "sys", "jax", "numpy"}


@pytest.fixture(scope="module")
def adapter():
    pytest.importorskip("jax")
    import importlib.util
    spec = importlib.util.spec_from_file_location("jax_adapter_independent", ADAPTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.jax
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_refnet_conformance_with_jax_passes_every_vector_with_kinks_compared(dtype, capsys):
    """`refnet conformance --framework jax` passes all of them, strictly; its float64 runs leave
    the global jax_enable_x64 flag as it was (a scoped enable_x64). Measured: the worst tensor
    uses 0.17 of its allowance (float64 and float32)."""
    jax = pytest.importorskip("jax")
    before = jax.config.jax_enable_x64
    code = main(["conformance", "--framework", "jax", "--dtype", dtype, "--strict-kinks",
                 "--json"])
    report = json.loads(capsys.readouterr().out)
    assert jax.config.jax_enable_x64 == before
    failing = [(v["name"], t["name"]) for v in report["vectors"] for t in v["tensors"]
               if not t["passed"]]
    assert code == 0 and failing == [] and len(report["vectors"]) == len(list(VECTORS.glob("*.json")))
    assert max(t["worst_ratio"] for v in report["vectors"] for t in v["tensors"]) < 0.5


@pytest.mark.jax
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_an_adapter_written_from_the_guide_passes_every_vector_with_kinks_compared(adapter, dtype):
    """tests/jax_adapter_independent.py, which follows spec/conformance.md and imports no refnet,
    passes every vector with its kink elements held to torch's conventions."""
    assert adapter.check(str(VECTORS), dtype, strict_kinks=True) == []


@pytest.mark.jax
@pytest.mark.parametrize("row", conventions_table(), ids=lambda r: r[2])
def test_each_changed_convention_fails_a_vector_of_its_row(adapter, row):
    """The adapter with one convention changed fails some vector its row names (float64, kinks
    compared strictly); a change that only moves kink elements passes when kinks are reported
    apart, as the table's last column says."""
    convention, vectors, switch, fails_lenient = row
    strict = adapter.check(str(VECTORS), "float64", True, {switch}, vectors)
    assert strict, f"{switch} ({convention}) fails none of {vectors}"
    lenient = adapter.check(str(VECTORS), "float64", False, {switch}, vectors)
    assert bool(lenient) is fails_lenient, lenient


@pytest.mark.jax
def test_a_changed_convention_fails_refnets_jax_twin_too(monkeypatch, capsys, tmp_path):
    """The built-in twin is held to the same vectors: leaky_relu written as jax.nn.leaky_relu
    (slope′(0) = 1) fails leaky_relu-zero with kinks compared, and passes without."""
    pytest.importorskip("jax")
    import shutil

    from refnet.interop import jax_twin
    shutil.copy(VECTORS / "leaky_relu-zero.json", tmp_path)
    original = jax_twin._activation

    def jax_convention(kind, c, z, params, jnp, jax_module):
        if kind == "leaky_relu":
            return jax_module.nn.leaky_relu(z, c["slope"])
        return original(kind, c, z, params, jnp, jax_module)
    monkeypatch.setattr(jax_twin, "_activation", jax_convention)
    assert main(["conformance", "--framework", "jax", "--dir", str(tmp_path)]) == 0
    assert "3 kink elements differ" in capsys.readouterr().out
    assert main(["conformance", "--framework", "jax", "--dir", str(tmp_path),
                 "--strict-kinks"]) == 1
