"""The package's floors hold: every import points down, and no import circle exists.

The floors are the `layers` contract in pyproject.toml (the one source; `lint-imports` checks it
in CI). This test re-checks them from the source text alone — every `import`, lazy ones inside
functions included — so that a plain `pytest` fails on an upward import or a circle without
import-linter installed. spec/architecture.md explains the floors.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "refnet"


def contracts_from_pyproject() -> List[dict]:
    """pyproject.toml's import-linter contracts."""
    try:
        import tomllib
    except ImportError:                       # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def floors_from_pyproject() -> List[List[str]]:
    """The `layers` contract's floors, top first; each floor a list of sibling packages."""
    layers = next(c["layers"] for c in contracts_from_pyproject() if c["type"] == "layers")
    return [[name.strip() for name in re.split(r"[|:]", floor)] for floor in layers]


def independent_from_pyproject() -> List[List[str]]:
    """The module groups of the `independence` contracts: no member imports another."""
    return [c["modules"] for c in contracts_from_pyproject() if c["type"] == "independence"]


def crossings(graph, groups) -> List[str]:
    """Imports between two members of one independence group."""
    def member(module, group):
        return next((m for m in group if module == m or module.startswith(m + ".")), None)
    bad = []
    for group in groups:
        for source, targets in graph.items():
            for target in targets:
                s, t = member(source, group), member(target, group)
                if s and t and s != t:
                    bad.append(f"{source} imports {target}")
    return sorted(bad)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> Dict[str, Set[str]]:
    """``{module: modules it imports}`` within the package, from the source (lazy imports too)."""
    modules = {module_name(p): p for p in package.rglob("*.py")}
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets.add(source)
                # `from pkg import sub` imports the submodule pkg.sub where there is one
                targets.update(f"{source}.{alias.name}" for alias in node.names
                               if f"{source}.{alias.name}" in modules)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def floor_of(module: str, floors: List[List[str]]) -> Tuple[int, str]:
    """(floor index, the sibling package it belongs to), or (-1, "") for the root package."""
    for index, siblings in enumerate(floors):
        for sibling in siblings:
            if module == sibling or module.startswith(sibling + "."):
                return index, sibling
    return -1, ""


def upward_imports(graph, floors) -> List[str]:
    """Imports from a floor to a higher one, or between two independent siblings of one floor."""
    bad = []
    for source, targets in graph.items():
        s_floor, s_pkg = floor_of(source, floors)
        for target in targets:
            t_floor, t_pkg = floor_of(target, floors)
            if s_floor < 0 or t_floor < 0:
                continue       # the root package's __init__ re-exports; it is no floor
            if t_floor < s_floor or (t_floor == s_floor and t_pkg != s_pkg):
                bad.append(f"{source} imports {target}")
    return sorted(bad)


def cycles(graph) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_of_the_package_sits_on_a_floor():
    """Each module belongs to one floor of the contract (a new top-level module must be placed)."""
    floors = floors_from_pyproject()
    unplaced = [m for m in import_graph() if m != "refnet" and floor_of(m, floors)[0] < 0
                and m != "refnet.__main__"]
    assert not unplaced, f"modules on no floor of pyproject's layers contract: {unplaced}"


def test_no_module_imports_a_higher_floor_or_an_independent_sibling():
    """Every import inside refnet points down the floors (spec/architecture.md)."""
    bad = upward_imports(import_graph(), floors_from_pyproject())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_verification_interop_and_lowp_do_not_import_each_other():
    """The independence contract: these packages stand on the model and numerics alone."""
    bad = crossings(import_graph(), independent_from_pyproject())
    assert not bad, "imports between independent packages:\n" + "\n".join(bad)


def test_the_package_has_no_import_circle():
    """No set of refnet modules imports itself round in a circle, lazy imports included."""
    found = cycles(import_graph())
    assert not found, f"import circles: {found}"


def unresolved_imports(package: Path = PACKAGE) -> List[str]:
    """Relative imports (lazy ones too) that name no module or package of refnet."""
    modules = {module_name(p) for p in package.rglob("*.py")}
    bad = []
    for path in package.rglob("*.py"):
        name = module_name(path)
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[: len(here) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
                if source not in modules:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {source}")
    return bad


def test_every_relative_import_names_a_module_of_the_package():
    """A lazy import inside a function fails only when called; this finds a stale one at once."""
    bad = unresolved_imports()
    assert not bad, "imports of modules that do not exist:\n" + "\n".join(bad)


def test_no_layer_module_imports_the_registry():
    """Containers get the registry's build function passed in; no layer module imports it."""
    graph = import_graph()
    importers = [m for m, targets in graph.items()
                 if "refnet.layers.registry" in targets and m.startswith("refnet.layers.")
                 and m != "refnet.layers.registry"]
    assert not importers, f"layer modules importing the registry: {importers}"


def test_the_checks_catch_a_planted_upward_import_and_a_planted_circle():
    """The checker itself: an upward arrow, a sibling crossing and a circle are all reported."""
    floors = floors_from_pyproject()
    graph = import_graph()
    planted = {k: set(v) for k, v in graph.items()}
    planted["refnet.numerics.backend"].add("refnet.model")           # numerics -> model: up
    planted["refnet.verification.triangle"].add("refnet.lowp.emulation")  # independent siblings
    assert upward_imports(planted, floors) == ["refnet.numerics.backend imports refnet.model"]
    assert crossings(planted, independent_from_pyproject()) == [
        "refnet.verification.triangle imports refnet.lowp.emulation"]
    planted["refnet.model"].add("refnet.numerics.backend")           # model already imports it
    planted["refnet.numerics.backend"].add("refnet.model")
    assert any({"refnet.model", "refnet.numerics.backend"} <= set(c) for c in cycles(planted))
