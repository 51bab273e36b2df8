"""The package's walls, read from the source: which folder may import which, no import cycle, and no test module
importing another. Every import counts, also those inside functions and under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "sluice"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Dotted sluice modules (or packages) that ``path`` imports."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "sluice" or name.startswith("sluice.")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        # "from sluice.x import y": y may be a module or a name; keep the longest prefix that is a module.
        targets = set()
        for imported in _imports(path):
            while imported not in modules and "." in imported:
                imported = imported.rpartition(".")[0]
            if imported in modules and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def _in(module: str, folder: str) -> bool:
    return module == folder or module.startswith(folder + ".")


@pytest.mark.parametrize("folder, forbidden", [
    ("sluice.engine", ["sluice.data", "sluice.config", "sluice.rollout", "sluice.trainer", "sluice.buffer",
                       "sluice.sync", "sluice.orchestration", "sluice.rewards"]),
    ("sluice.models", ["sluice.engine", "sluice.trainer", "sluice.config", "sluice.rollout", "sluice.sync"]),
    ("sluice.weights", ["sluice.engine", "sluice.sync", "sluice.trainer", "sluice.config"]),
    ("sluice.algorithms", ["sluice.config", "sluice.trainer", "sluice.engine", "sluice.rollout"]),
    ("sluice.rewards", ["sluice.config", "sluice.engine", "sluice.trainer"]),
    ("sluice.net", ["sluice.engine", "sluice.rollout", "sluice.config"]),
    ("sluice.errors", ["sluice"]),
])
def test_folders_import_only_what_the_architecture_allows(graph, folder, forbidden):
    wrong = sorted((module, target) for module, targets in graph.items() if _in(module, folder)
                   for target in targets for banned in forbidden
                   if _in(target, banned) and not _in(target, folder))
    assert not wrong, f"{folder} must not import {forbidden}: {wrong}"


def test_sync_reaches_the_engine_only_through_its_clients(graph):
    wrong = sorted((m, t) for m, targets in graph.items() if _in(m, "sluice.sync") for t in targets
                   if _in(t, "sluice.engine") and not _in(t, "sluice.engine.clients")
                   and t != "sluice.engine.local_engine")  # LocalEngine: a type hint under TYPE_CHECKING
    assert not wrong


def test_no_import_cycle(graph):
    """Module-level and deferred imports alike: a cycle is a wall in the wrong place. A package's ``__init__``
    re-exporting its own modules is not an edge between walls, so it is left out."""
    def is_package(module: str) -> bool:
        return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists()

    edges = {m: {t for t in targets if not (is_package(m) and _in(t, m))} for m, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            assert state.get(target) != 1, f"import cycle: {' -> '.join(path[path.index(target):] + [module, target])}"
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_no_test_module_imports_another():
    tests = ROOT / "tests"
    names = {path.stem for path in tests.rglob("test_*.py")}
    wrong = []
    for path in tests.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] in names:
                wrong.append(f"{path.relative_to(ROOT)} imports {node.module}")
            elif isinstance(node, ast.Import):
                wrong += [f"{path.relative_to(ROOT)} imports {a.name}" for a in node.names
                          if a.name.split(".")[-1] in names]
    assert not wrong, wrong
