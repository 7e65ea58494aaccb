"""The package's layout is its architecture: folders in layers, imports in one direction.

- No module imports another in a circle.
- A folder imports only from itself and from the folders below it in ``LAYERS`` (``operations``
  may use ``proof``; ``proof`` may not use ``engine``), so a newcomer can read the package bottom up.
- No module is over ``MAX_LINES`` lines and no function over ``MAX_FUNCTION_LINES`` (docstrings not
  counted), except those listed with their length in ``LONG``, which may shrink but not grow.

Imports anywhere in a module count (a function-level import is a dependency too); only imports
under ``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loramerge"

# Bottom to top. The top-level modules (errors, preserve) are below every folder.
LAYERS = ("", "numerics", "formats", "plan", "proof", "engine", "operations", "cli")
MAX_LINES = 400
MAX_FUNCTION_LINES = 80
# Known longer functions and modules: (limit they must stay within). Shrink these; do not add.
LONG: dict[str, int] = {}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The package modules (dotted, without ``loramerge.``) that ``tree`` imports."""
    found: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking_only(node):
            found |= {m for child in node.orelse for m in _imports(ast.Module([child], []), modules)}
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "loramerge":
            base = node.module.partition(".")[2]
            names = [f"{base}.{a.name}".lstrip(".") for a in node.names]  # ``from loramerge.x import mod``
            found |= {n for n in names if n in modules} or ({base} & modules)
        elif isinstance(node, ast.Import):
            found |= {a.name.partition(".")[2] for a in node.names if a.name.startswith("loramerge.")} & modules
        found |= _imports(node, modules)
    return found


def _modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py"
    }


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    names = set(modules)
    return {m: _imports(ast.parse(p.read_text(encoding="utf-8")), names) - {m} for m, p in modules.items()}


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


def _layer(module: str) -> int:
    folder = module.rpartition(".")[0]
    assert folder in LAYERS, f"{module}: the folder {folder!r} is not in LAYERS; place it there"
    return LAYERS.index(folder)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if _layer(d) > _layer(m))


def test_no_module_imports_in_a_circle() -> None:
    graph = _graph()
    assert len(graph) > 40 and graph["operations.inmemory"], "the scan finds the package's imports"
    cycle = _cycle(graph)
    assert cycle is None, "modules import one another in a circle: " + " -> ".join(cycle or [])


def test_folders_import_only_from_the_layers_below() -> None:
    graph = _graph()
    assert "numerics.delta" in graph["operations.inmemory"], "the scan follows imports into folders"
    assert _upward(graph) == [], "imports against the layer order " + " < ".join(LAYERS[1:])


def test_the_scan_finds_a_cycle_and_an_upward_import() -> None:
    """Negative controls: a cycle through a function-level import, and an upward import."""
    tree = ast.parse("def f():\n    from loramerge.operations.hub import push_to_hub\n")
    graph = {
        "formats.adapter": _imports(tree, {"operations.hub", "formats.adapter"}),
        "operations.hub": {"formats.adapter"},
    }
    assert _cycle(graph) == ["formats.adapter", "operations.hub", "formats.adapter"]
    assert _upward(graph) == ["formats.adapter -> operations.hub"]
    tree = ast.parse("from loramerge.numerics import delta\n")
    assert _imports(tree, {"numerics.delta"}) == {"numerics.delta"}


def _function_lengths(tree: ast.AST) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
            length = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and first.end_lineno is not None:
                length -= first.end_lineno - first.lineno + 1  # the docstring is documentation, not code
            out[node.name] = max(out.get(node.name, 0), length)
    return out


def _too_long() -> dict[str, int]:
    found: dict[str, int] = {}
    for module, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if (lines := len(text.splitlines())) > MAX_LINES:
            found[module] = lines
        for name, length in _function_lengths(ast.parse(text)).items():
            if length > MAX_FUNCTION_LINES:
                found[f"{module}.{name}"] = length
    return found


def test_modules_and_functions_stay_short() -> None:
    found = _too_long()
    grown = {k: v for k, v in found.items() if v > LONG.get(k, 0)}
    assert not grown, f"over {MAX_LINES} lines a module or {MAX_FUNCTION_LINES} a function (split it): {grown}"
    gone = sorted(set(LONG) - set(found))
    assert not gone, f"now short enough: remove from LONG {gone}"


def test_the_length_scan_measures_functions() -> None:
    """Negative control: a long function is measured as long."""
    tree = ast.parse('def f():\n    """A docstring\n    of two lines."""\n' + "    x = 1\n" * 90)
    assert _function_lengths(tree) == {"f": 91}, "def line and body counted, the docstring not"
