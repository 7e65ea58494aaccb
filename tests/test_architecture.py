"""The package's modules import one another in one direction: no cycles.

Imports anywhere in a module count (a function-level import is a dependency too); only imports
under ``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loramerge"


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking_only(node):
            found |= {m for child in node.orelse for m in _imports(ast.Module([child], []), modules)}
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "loramerge":
            parts = node.module.split(".")
            names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
            found |= {n for n in names if n in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("loramerge.")} & modules
        found |= _imports(node, modules)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {
        m: _imports(ast.parse((PACKAGE / f"{m}.py").read_text(encoding="utf-8")), modules) - {m, "__init__"}
        for m in modules
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_no_module_imports_in_a_circle() -> None:
    graph = _graph()
    assert len(graph) > 20 and graph["inmemory"], "the scan finds the package's imports"
    cycle = _cycle(graph)
    assert cycle is None, "modules import one another in a circle: " + " -> ".join(cycle or [])


def test_the_scan_finds_a_cycle_when_there_is_one() -> None:
    """Negative control: a graph with a cycle through a function-level import is reported."""
    tree = ast.parse("def f():\n    from loramerge.hub import push_to_hub\n")
    graph = {"adapter": _imports(tree, {"hub", "adapter"}), "hub": {"adapter"}}
    assert _cycle(graph) == ["adapter", "hub", "adapter"]
