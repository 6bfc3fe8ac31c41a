"""The house's structure: no import cycles, no arrow back up the tree, no private names taken.

Imports are read from the source (those inside functions too), not executed, so a cycle hidden
in a function body counts like one at the top of a module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from stack.services import ROOT

PACKAGES = ("detector", "publisher", "stack")

#: Each room of `detector`, and the rooms below it that it may import. A module outside the
#: subpackages is its own room. Nothing imports `main`, `cli` or `__main__` (the entry points).
FLOORS: dict[str, set[str]] = {
    "errors": set(),
    "vocabulary": {"errors"},
    "logs": set(),
    "transaction": {"errors", "vocabulary"},
    "schemas": {"transaction", "errors", "vocabulary"},
    "state": {"errors", "vocabulary"},
    "rules": {"errors", "vocabulary"},
    "model": {"errors", "vocabulary"},
    "engine": {"errors", "vocabulary", "transaction", "state", "rules"},
    "config": {"errors", "vocabulary", "engine", "state", "rules", "model"},
    "functions": {"errors", "vocabulary", "transaction", "engine", "config", "state", "logs"},
    "offline": {
        "errors",
        "vocabulary",
        "transaction",
        "engine",
        "config",
        "state",
        "rules",
        "model",
    },
    "worker": {
        "errors",
        "vocabulary",
        "transaction",
        "engine",
        "config",
        "state",
        "logs",
        "functions",
    },
    "redrive": {"errors", "functions"},
    "cli": {"errors", "vocabulary", "config", "offline", "schemas", "logs", "redrive", "worker"},
    "main": {"logs", "functions"},
    "__main__": {"cli"},
    "__init__": set(),
}


def modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path


def imports(name: str, path: Path) -> Iterator[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, nested included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            yield base, [alias.name for alias in node.names]


def graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a submodule named in `from pkg import sub`)."""
    known = dict(modules())
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for target, names in imports(name, path):
            if target.split(".")[0] not in PACKAGES:
                continue
            submodules = [f"{target}.{taken}" for taken in names if f"{target}.{taken}" in known]
            edges[name].update(submodules)
            if target in known and target != name and len(submodules) < max(len(names), 1):
                edges[name].add(target)
    return edges


def test_no_import_cycles() -> None:
    """No module reaches itself through imports, counting imports inside functions."""
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert cycles == []


def room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "detector":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_arrow_runs_back_up() -> None:
    """Each room of `detector` imports only the rooms below it (FLOORS)."""
    wrong = []
    for module, targets in graph().items():
        here = room(module)
        if here is None:
            continue
        assert here in FLOORS, f"{module}: a new room; place it in FLOORS"
        for target in targets:
            there = room(target)
            if there is not None and there != here and there not in FLOORS[here]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


@pytest.mark.parametrize("package", ["detector", "publisher", "stack", "tests"])
def test_no_module_takes_another_modules_private_names(package: str) -> None:
    """`from x import _name` only within one module's own family (a C part of its package)."""
    taken = []
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for target, names in imports(name, path):
            if target.split(".")[0] not in (*PACKAGES, "tests"):
                continue
            taken += [f"{name}: {target}.{n}" for n in names if n.startswith("_")]
    assert taken == []


def test_every_package_says_what_it_is_and_what_it_exports() -> None:
    """Each package of `detector` has a one-line docstring and an `__all__`."""
    for init in sorted((ROOT / "detector").rglob("__init__.py")):
        tree = ast.parse(init.read_text())
        doc = ast.get_docstring(tree)
        assert doc and "\n" not in doc.strip().split("\n\n")[0], init
        assigned = {
            target.id
            for node in tree.body
            if isinstance(node, ast.Assign | ast.AnnAssign)
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Name)
        }
        assert "__all__" in assigned, init
