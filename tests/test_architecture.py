"""The project's import structure: no import cycle between its modules (function-level imports included),
layers import only downward (models <- training; models <- extraction, service; cli on top), and every
package and module imports on its own."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "training", "service", "extraction")
TOP_LEVEL_MODULES = ("cli",)
FORBIDDEN = {
    "models": {"service", "training", "extraction", "cli"},
    "service": {"training", "extraction", "cli"},
    "extraction": {"training", "service", "cli"},
    "training": {"service", "extraction", "cli"},
}
"""What each layer may not import (by top-level name)."""


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project's own packages and top-level modules."""
    modules = {name: ROOT / f"{name}.py" for name in TOP_LEVEL_MODULES}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every name an `import` or `from ... import` anywhere in the file (functions included) may refer to."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        imported = _imported_names(tree, name, path.name == "__init__.py")
        graph[name] = {target for target in imported if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "extraction.ray_engine" in graph["extraction.job"]  # imported inside a function (Ray is optional)
    assert "extraction.job" in graph["cli"]


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downward(layer):
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if module.split(".")[0] == layer
        for target in targets
        if target.split(".")[0] in FORBIDDEN[layer]
    )
    assert not wrong, wrong


def _python(code: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", PACKAGES + TOP_LEVEL_MODULES)
def test_each_package_imports_on_its_own(name):
    result = _python(f"import {name}")
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_module_imports():
    """Each module imported first in a package of its own process would cost a torch import per module; one
    process importing them in reverse dependency order still fails on any module that needs an import it
    does not make itself."""
    graph = import_graph()
    order = sorted(graph, key=lambda m: (-_depth(m, graph), m))
    code = (
        "import importlib, sys\nfailed = []\n"
        f"for name in {order!r}:\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except Exception as exc:\n        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed)); sys.exit(1 if failed else 0)\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _depth(module: str, graph: dict[str, set[str]], seen: frozenset[str] = frozenset()) -> int:
    """Longest chain of project imports below `module` (0 for a module importing none)."""
    below = [t for t in graph[module] if t not in seen]
    return 1 + max((_depth(t, graph, seen | {module}) for t in below), default=-1)
