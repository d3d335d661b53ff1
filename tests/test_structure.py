"""The package's layers are one-way: its import graph (every import, function-level and
``TYPE_CHECKING`` ones included) has no cycle, no module imports the package face
(``cwtflow/__init__.py``), no private name crosses a module boundary, and no module is much
over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "cwtflow"
MODULES = {p.stem: p for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """The package modules ``path`` imports, and the private names it takes from them
    (``from .m import _x`` or ``m._x`` on an imported module ``m``)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    private: list[str] = []
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and not (node.module or "").startswith("cwtflow"):
                continue
            module = (node.module or "").removeprefix("cwtflow").lstrip(".")
            if module:
                found.add(module.split(".")[0])
                private += [f"{module}.{a.name}" for a in node.names if _private(a.name)]
            else:  # from . import x
                for alias in node.names:
                    found.add(alias.name if alias.name in MODULES else "__init__")
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "cwtflow":
                    found.add("__init__")
                elif alias.name.startswith("cwtflow."):
                    found.add(alias.name.split(".")[1])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and aliases.get(node.value.id) in MODULES
            and _private(node.attr)
        ):
            private.append(f"{aliases[node.value.id]}.{node.attr}")
    return found, private


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_the_walker_sees_every_kind_of_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .engine import CWT\n"
        "def f():\n    from . import core\n    return core._row_blocks\n"
        "import cwtflow\nfrom .store import _x\n"
    )
    found, private = _imports(source)
    assert found == {"engine", "core", "__init__", "store"}
    assert sorted(private) == ["core._row_blocks", "store._x"]


def test_no_module_imports_the_package_face() -> None:
    offenders = [name for name, (found, _) in GRAPH.items() if "__init__" in found]
    assert offenders == []


def test_no_private_name_crosses_modules() -> None:
    offenders = {name: private for name, (_, private) in GRAPH.items() if private}
    assert offenders == {}


def test_import_graph_has_no_cycle() -> None:
    edges = {name: sorted(found & MODULES.keys()) for name, (found, _) in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in edges:
        if name not in state:
            visit(name, [name])
    assert cycles == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_readable(name: str) -> None:
    assert len(MODULES[name].read_text().splitlines()) <= 550
